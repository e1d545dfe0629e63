"""The long fault and fuzz tests (``make reliability``): the fixtures of the fault suite
(private servers, a recording) and of the security suite (a gateway with two networks);
the 3-broker tests use the session's MongoDB, S3 and SMTP servers with their own Kafka cluster."""

from tests.conftest import mail_dir, ports, servers, session_log_file
from tests.system.fault.conftest import faults, private_servers, wav
from tests.system.security.conftest import gw

__all__ = ["faults", "gw", "mail_dir", "ports", "private_servers", "servers", "session_log_file", "wav"]
