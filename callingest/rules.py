"""Campaign-configuration rules a call must satisfy, shared by the gateway and the validator.

Each check returns problems as ``(error class, message)`` pairs in the spec's
vocabulary; an empty list means the call passes.
"""

from __future__ import annotations

from typing import Any

LANGUAGE_CODES = ("en-US", "en-GB", "es-ES", "fr-FR")
CAMPAIGN_CLASS = "call.advertiser_campaign_id_from_network"

Problem = tuple[str, str]


def transcription_enabled(campaign: dict[str, Any]) -> bool:
    """Transcription runs when Signal AI is on or at least one voice signal is configured."""
    return bool(campaign.get("signal_ai_enabled")) or int(campaign.get("voice_signals") or 0) > 0


def campaign_problems(campaign: dict[str, Any] | None) -> list[Problem]:
    """The campaign must exist, be ExternalOnly, and have transcription enabled."""
    if campaign is None:
        return [(CAMPAIGN_CLASS, "campaign not found")]
    if campaign.get("type") != "ExternalOnly":
        return [(CAMPAIGN_CLASS, "campaign must be for external calls only")]
    if not transcription_enabled(campaign):
        return [(CAMPAIGN_CLASS, "campaign must have transcription enabled")]
    return []


def network_language(network: dict[str, Any]) -> str:
    return str(network.get("default_language_code") or "en-US")


def language_problem(network: dict[str, Any], language_code: str | None) -> str | None:
    """Why ``language_code`` cannot be used on this network, or None."""
    if language_code is None:
        return None
    if language_code not in LANGUAGE_CODES:
        return f"language_code must be one of {', '.join(LANGUAGE_CODES)}"
    if not network.get("multi_language_enabled") and language_code != network_language(network):
        return (f"language_code {language_code} requires multi-language processing; "
                f"this network processes {network_language(network)}")
    return None


def signal_names(network: dict[str, Any]) -> dict[str, str]:
    """Configured signal names by lower-case name."""
    return {str(n).lower(): str(n) for n in network.get("signals", [])}


def custom_data_names(network: dict[str, Any]) -> dict[str, str]:
    """Configured custom data field names by lower-case name."""
    return {str(n).lower(): str(n) for n in network.get("custom_data_fields", [])}


def auth_config(network: dict[str, Any], config_id: str | None) -> dict[str, Any] | None:
    """The network's recording auth config with this id, or None."""
    if config_id is None:
        return None
    for config in network.get("recording_auth_configs", []):
        if str(config.get("id")) == str(config_id):
            return dict(config)
    return None


def call_problems(network: dict[str, Any], call: dict[str, Any]) -> list[str]:
    """Field problems of an already-parsed call against the network's current configuration."""
    problems: list[str] = []
    lang = language_problem(network, call.get("language_code"))
    if lang:
        problems.append(lang)
    known_signals = signal_names(network)
    for s in call.get("signals", []):
        if str(s["name"]).lower() not in known_signals:
            problems.append(f"signal '{s['name']}' is not configured for this network")
    known_fields = custom_data_names(network)
    for c in call.get("custom_data", []):
        if str(c["name"]).lower() not in known_fields:
            problems.append(f"custom data field '{c['name']}' is not configured for this network")
    config_id = call.get("recording_auth_config_id")
    if config_id is not None and auth_config(network, config_id) is None:
        problems.append(f"recording_auth_config_id {config_id} does not exist in this network")
    return problems
