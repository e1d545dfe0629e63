"""The ``callingest`` command: serve a service, apply configuration, inspect and replay calls."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any

from callingest.stages import CALL_STAGES, SERVICES


def command_name(args: argparse.Namespace) -> str:
    """The command's entry in :data:`callingest.settings_usage.ENTRY_POINTS`: the service of
    ``serve``, else the command and its action (``admin-rotate-secrets``, ``replay``)."""
    if args.command == "serve":
        return str(args.service)
    action = getattr(args, f"{args.command}_command", None)
    return f"{args.command}-{action}" if action else str(args.command)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callingest",
        description="Call ingestion platform: the Call Ingestion API and its processing pipeline.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run one service in the foreground",
                           description="Run one service in the foreground until SIGTERM.")
    serve.add_argument("service", choices=SERVICES)

    config = sub.add_parser("config", help="manage configuration",
                            description="Manage networks, tokens, campaigns and auth configs.")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    apply = config_sub.add_parser("apply", help="upsert the configuration in a YAML file",
                                  description="Upsert networks, tokens, advertisers, campaigns, "
                                  "signals, custom data fields and recording auth configs from "
                                  "a YAML file. Idempotent; a bad file changes nothing.")
    apply.add_argument("file", type=Path)

    calls = sub.add_parser("calls", help="inspect calls", description="Inspect calls.")
    calls_sub = calls.add_subparsers(dest="calls_command", required=True, metavar="ACTION")
    show = calls_sub.add_parser("show", help="a call's record and processing history as JSON",
                                description="Print a call's record and history as JSON.")
    show.add_argument("cuid")

    replay = sub.add_parser(
        "replay", help="re-publish failed calls to the stage that failed",
        description="Re-publish failed calls to the stage that failed, after the recording is "
        "restored or the configuration corrected. Filters combine with AND.")
    replay.add_argument("--cuid", action="append", default=[], help="a call to replay (repeatable)")
    replay.add_argument("--stage", choices=CALL_STAGES, help="only calls that failed in this stage")
    replay.add_argument("--since", type=_iso, help="only calls that failed at or after this ISO time")
    replay.add_argument("--failure-class", help="only calls that failed with this class")
    replay.add_argument("--dry-run", action="store_true", help="list what would be replayed")

    admin = sub.add_parser("admin", help="operations", description="Operational tasks.")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    admin_sub.add_parser("init", help="create topics, indexes and the bucket (idempotent)",
                         description="Create every Kafka topic, MongoDB index and the S3 bucket.")
    admin_sub.add_parser(
        "rotate-secrets", help="re-encrypt every stored secret with the newest key",
        description="Re-encrypt every stored secret (recording auth-config tokens, ...) with the "
        "first key of SECRET_KEYS. Idempotent and resumable: run it again after an interruption.")
    keygen = admin_sub.add_parser(
        "generate-secret-key", help="print a new SECRET_KEYS entry (kid:base64key)",
        description="Print a new random 256-bit data key as a SECRET_KEYS entry.")
    keygen.add_argument("--kid", help="key id (default: random)")
    return parser


def _iso(value: str) -> datetime:
    from dateutil import parser as dateparser

    try:
        parsed = dateparser.isoparse(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a UTC offset or Z: {value!r}")
    return parsed


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from callingest.settings import load_settings, use_dev_stack_env
    from callingest.settings_usage import reads

    if args.command == "admin" and args.admin_command == "generate-secret-key":
        # It reads no setting (its entry in ENTRY_POINTS reads none): none is loaded or required.
        from callingest.secretbox import generate_key_entry

        print(generate_key_entry(args.kid))
        return 0
    if args.command != "serve":
        use_dev_stack_env()

    # Only what the command reads is required (the gateway needs no SMTP_HOST); checked
    # before anything connects.
    settings = load_settings(reads(command_name(args)))
    if args.command == "serve":
        module = importlib.import_module(f"services.{args.service}.main")
        try:
            asyncio.run(module.serve(settings))
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "config":
        return _run("config apply", _config_apply(settings, args.file))
    if args.command == "calls":
        return _run("calls show", _calls_show(settings, args.cuid))
    if args.command == "replay":
        from callingest.replay import ReplayFilter, run_replay

        flt = ReplayFilter(cuids=args.cuid, stage=args.stage, since=args.since,
                           failure_class=args.failure_class)
        return _run("replay", run_replay(settings, flt, dry_run=args.dry_run))
    if args.command == "admin" and args.admin_command == "rotate-secrets":
        from callingest.rotation import run_rotation

        return _run("admin rotate-secrets", run_rotation(settings))
    if args.command == "admin":
        return asyncio.run(_admin_init(settings))
    return 2


def _run(command: str, work: Coroutine[Any, Any, int]) -> int:
    """Run an operator command; MongoDB or Kafka out of reach is one line on stderr and exit 1,
    not a traceback (scrubbed: a driver's message may quote its URI)."""
    from aiokafka.errors import KafkaError
    from pymongo.errors import PyMongoError

    from callingest.logging import scrub

    try:
        return asyncio.run(work)
    except (KafkaError, PyMongoError) as exc:
        print(scrub(f"callingest {command}: {type(exc).__name__}: {exc}")[:800], file=sys.stderr)
        return 1


async def _config_apply(settings: Any, path: Path) -> int:
    from callingest import config_apply, config_file, mongo
    from callingest.secretbox import load_keyring

    keyring = load_keyring(settings)
    try:
        config = config_file.load(path)
    except config_file.ConfigError as exc:
        print(f"callingest config apply: {exc}", file=sys.stderr)
        return 1
    client = mongo.open_client(settings)
    try:
        db = mongo.database(client, settings)
        changes = await config_apply.apply(db, config, keyring)
    finally:
        await client.close()
    for line in changes:
        print(line)
    for warning in config_apply.webhook_warnings(config, settings.allow_loopback_webhooks):
        print(warning, file=sys.stderr)
    print(f"{path}: {len(changes)} change(s) applied" if changes else f"{path}: already up to date")
    return 0


async def _calls_show(settings: Any, cuid: str) -> int:
    from callingest import mongo
    from callingest.logging import scrub

    client = mongo.open_client(settings)
    try:
        db = mongo.database(client, settings)
        call = await db.calls.find_one({"_id": cuid})
        deliveries = await webhook_deliveries(db, cuid)
    finally:
        await client.close()
    if call is None:
        print(f"callingest calls show: no call {cuid}", file=sys.stderr)
        return 1
    call["cuid"] = call.pop("_id")
    call.setdefault("retrying", None)  # where a waiting call stands (set by the retry path)
    call.pop("content_hash", None)
    call["webhook_deliveries"] = deliveries
    print(scrub(json.dumps(call, default=_json_default, indent=2, sort_keys=True)))
    return 0


async def webhook_deliveries(db: Any, cuid: str) -> list[dict[str, Any]]:
    """One entry per webhook attempt of the call (event, attempt, answer code, time), oldest first."""
    entries = []
    async for delivery in db.webhook_deliveries.find({"cuid": cuid}, {"body": 0}):
        for attempt in delivery.get("attempts", []):
            entries.append({
                "event": delivery["type"], "event_id": delivery["event_id"],
                "webhook_id": delivery["webhook_id"], "attempt": attempt["attempt"],
                "status_code": attempt.get("status_code"), "outcome": attempt["outcome"],
                "error": attempt.get("error"), "at": attempt["at"],
            })
        if delivery["status"] == "pending":
            entries.append({"event": delivery["type"], "event_id": delivery["event_id"],
                            "webhook_id": delivery["webhook_id"],
                            "attempt": int(delivery.get("attempts_made", 0)) + 1,
                            "status_code": None, "outcome": "scheduled", "error": None,
                            "at": delivery["next_attempt_at"]})
    entries.sort(key=lambda e: e["at"])
    return entries


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


class _KafkaReasons(logging.Handler):
    """aiokafka logs why it could not reach a broker (a certificate it does not trust, a
    refused port) and raises only "Unable to bootstrap": keep the reasons for admin init's
    one line instead of letting them reach stderr as lines of their own."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.reasons.append(record.getMessage())


async def _admin_init(settings: Any) -> int:
    from aiokafka.errors import KafkaConnectionError, KafkaError
    from botocore.exceptions import BotoCoreError, ClientError
    from pymongo.errors import PyMongoError

    from callingest.infra import prepare_infrastructure

    aiokafka_log = logging.getLogger("aiokafka")
    reasons = _KafkaReasons()
    aiokafka_log.addHandler(reasons)
    aiokafka_log.propagate = False
    try:
        await prepare_infrastructure(settings)
    except (KafkaError, PyMongoError, BotoCoreError, ClientError, OSError) as exc:
        # The Job retries (backoffLimit); one clear line says what is wrong.
        why = f" ({reasons.reasons[-1]})" if reasons.reasons and isinstance(
            exc, KafkaConnectionError) else ""
        print(f"callingest admin init: {type(exc).__name__}: {exc}{why}"[:800], file=sys.stderr)
        return 1
    finally:
        aiokafka_log.removeHandler(reasons)
        aiokafka_log.propagate = True
    print("topics, indexes and bucket ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
