"""The gateway fixtures (tests/gateway/conftest.py) for the clients' tests of issue 12."""

from tests.gateway.conftest import configured_db, gateway, read_events

__all__ = ["configured_db", "gateway", "read_events"]
