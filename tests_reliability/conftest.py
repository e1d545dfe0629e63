"""The long fault and fuzz tests (``make reliability``): the fixtures of the fault suite
(private servers, a recording) and of the security suite (a gateway with two networks);
the 3-broker tests use the session's MongoDB, S3 and SMTP servers with their own Kafka cluster;
the hard stop behind pytest-timeout of tests/conftest.py."""

from tests.conftest import (
    mail_dir,
    ports,
    pytest_configure,
    pytest_timeout_cancel_timer,
    pytest_timeout_set_timer,
    servers,
    session_log_file,
)
from tests.system.fault.conftest import faults, private_servers, wav
from tests.system.security.conftest import gw

__all__ = ["faults", "gw", "mail_dir", "ports", "private_servers", "pytest_configure",
           "pytest_timeout_cancel_timer", "pytest_timeout_set_timer", "servers", "session_log_file", "wav"]
