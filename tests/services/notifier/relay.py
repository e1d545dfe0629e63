"""A real SMTP relay on loopback for the notifier's tests: aiosmtpd offering STARTTLS with a
certificate made at test time (a throwaway CA, :class:`tools.kafka_cluster.CertificateAuthority`)
and requiring a login, as a submission port (587) does."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from tests.conftest import free_port
from tools.kafka_cluster import CertificateAuthority

USERNAME = "callingest-relay"
PASSWORD = "relay-pw-7f3c9a1e"


class Relay:
    """Accepts mail only after a login as :data:`USERNAME` / :data:`PASSWORD`; with
    ``login_needs_tls`` (aiosmtpd's default) it offers AUTH only after STARTTLS."""

    def __init__(self, directory: Path, login_needs_tls: bool = True) -> None:
        ca = CertificateAuthority()
        self.ca_file = directory / "relay-ca.pem"
        self.ca_file.write_text(ca.cert_pem())
        chain = directory / "relay-key-and-chain.pem"
        chain.write_text(ca.issue_server())
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(chain)
        self.port = free_port()
        #: (user name, password, over TLS) of every login attempt.
        self.logins: list[tuple[str, str, bool]] = []
        self.messages: list[bytes] = []
        self.controller = Controller(
            self, hostname="127.0.0.1", port=self.port, tls_context=tls,
            authenticator=self._authenticate, auth_required=True,
            auth_require_tls=login_needs_tls)

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        login, password = auth_data.login.decode(), auth_data.password.decode()
        self.logins.append((login, password, session.ssl is not None))
        ok = (login, password) == (USERNAME, PASSWORD)
        return AuthResult(success=ok, handled=False)  # not handled: the relay answers 535

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.original_content or envelope.content)
        return "250 Message accepted for delivery"
