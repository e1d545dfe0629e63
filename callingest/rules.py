"""The configuration rules a call must satisfy: one function per rule, one text per problem.

The gateway (``services.gateway.models``, while it validates a request) and the validator
(:func:`call_problems`, for every CallSubmitted event, replays included) call the same
functions on the same read model (:class:`~callingest.config_file.NetworkSettings`,
:class:`~callingest.config_file.StoredCampaign`), so a problem reads the same whichever
path found it: ``Validation failed: '<field>' <text>, '<field>' <text>`` for field rules
(:func:`record_invalid`), the campaign's class and text for the campaign rule.
"""

from __future__ import annotations

from typing import Any

from callingest.config_file import LANGUAGE_CODES, NetworkSettings, StoredCampaign

CAMPAIGN_CLASS = "call.advertiser_campaign_id_from_network"
RECORD_INVALID_CLASS = "RecordInvalid"


class Violation(ValueError):
    """A call breaks a configuration rule; ``text`` follows the field's name."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def campaign_problem(campaign: StoredCampaign | None) -> str | None:
    """The campaign must exist, be ExternalOnly, and have transcription enabled."""
    if campaign is None:
        return "campaign not found"
    if campaign.type != "ExternalOnly":
        return "campaign must be for external calls only"
    if not campaign.transcription_enabled:
        return "campaign must have transcription enabled"
    return None


def language_code(network: NetworkSettings, value: str) -> str:
    """The canonical spelling of ``value`` (matched case-insensitively), if the network
    may process it."""
    canonical = next((c for c in LANGUAGE_CODES if c.casefold() == value.strip().casefold()),
                     None)
    if canonical is None:
        raise Violation("must be one of " + " ".join(LANGUAGE_CODES))
    if not network.multi_language_enabled and canonical != network.default_language_code:
        raise Violation(f"must be {network.default_language_code}: "
                        "multiple language processing is not enabled for the network")
    return canonical


def signal_name(network: NetworkSettings, value: str) -> str:
    """The configured spelling of the signal ``value``."""
    name = network.signal(value)
    if name is None:
        raise Violation("is not a signal configured for the network")
    return name


def custom_data_name(network: NetworkSettings, value: str) -> str:
    """The configured spelling of the custom data field ``value``."""
    name = network.custom_data_field(value)
    if name is None:
        raise Violation("is not a custom data field configured for the network")
    return name


def recording_auth_config_id(network: NetworkSettings, value: str) -> str:
    """``value``, if it names a recording auth config of the network."""
    if network.recording_auth_config(value) is None:
        raise Violation("does not name a recording auth config of the network")
    return value


def field_problem(path: str, text: str) -> str:
    """One problem of a field, as it appears in a ``RecordInvalid`` message."""
    return f"'{path}' {text}" if path else text


def record_invalid(problems: list[str]) -> str:
    """The ``RecordInvalid`` message naming every problem."""
    return "Validation failed: " + ", ".join(problems)


def call_problems(network: NetworkSettings, call: dict[str, Any]) -> list[str]:
    """The field problems of a CallSubmitted event against the network's configuration."""
    problems: list[str] = []

    def check(path: str, rule: Any, value: Any) -> None:
        try:
            rule(network, str(value))
        except Violation as exc:
            problems.append(field_problem(path, exc.text))

    if call.get("language_code") is not None:
        check("call.language_code", language_code, call["language_code"])
    if call.get("recording_auth_config_id") is not None:
        check("call.recording_auth_config_id", recording_auth_config_id,
              call["recording_auth_config_id"])
    for i, signal in enumerate(call.get("signals") or []):
        check(f"signals[{i}].name", signal_name, signal["name"])
    for i, datum in enumerate(call.get("custom_data") or []):
        check(f"custom_data[{i}].name", custom_data_name, datum["name"])
    return problems
