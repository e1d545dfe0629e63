"""The long fault and fuzz tests (``make reliability``): the fixtures of the fault suite
(private servers, a recording) and of the security suite (a gateway with two networks)."""

from tests.conftest import ports, servers, session_log_file
from tests.fault.conftest import faults, private_servers, wav
from tests.security.conftest import gw

__all__ = ["faults", "gw", "ports", "private_servers", "servers", "session_log_file", "wav"]
