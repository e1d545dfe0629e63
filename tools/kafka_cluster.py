"""A KRaft Kafka cluster of N brokers on loopback, from the jars `make setup` installs.

Used by the reliability suite (3 brokers, replication factor 3, min.insync.replicas 2)
and by the managed-Kafka tests (one broker with SASL_PLAINTEXT, SSL and SASL_SSL listeners
besides the plaintext one; TLS with a throwaway CA made at start, PEM files only). Every
node is a combined broker + controller (static quorum), runs in its own
process group with its data, config and log under ``run_dir/kafka-<id>``; ``kill9`` and
``start`` act on one node. Ports are the caller's (loopback only).

Usage: ``python -m tools.kafka_cluster up|down RUN_DIR PORT,PORT,PORT CONTROLLER,PORT,...``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools import devstack

ROOT = Path(__file__).resolve().parent.parent
LIBS = Path(os.environ.get("KAFKA_LIBS", ROOT / ".tools" / "kafka" / "libs"))
"""The broker's jars (`make setup`); KAFKA_LIBS points elsewhere."""


@dataclass
class Sasl:
    """A SASL_PLAINTEXT listener accepting PLAIN and SCRAM-SHA-512 for one user."""

    ports: list[int]
    username: str
    password: str
    mechanisms: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-512")


@dataclass
class Tls:
    """SSL listeners on ``ports`` and, when the cluster has ``Sasl``, SASL_SSL listeners on
    ``sasl_ports`` (same users and mechanisms as SASL_PLAINTEXT). The brokers' certificate is
    for 127.0.0.1 and localhost, signed by a CA made at start (``KafkaCluster.ca_file``)."""

    ports: list[int]
    sasl_ports: list[int] = field(default_factory=list)


class CertificateAuthority:
    """A throwaway CA (EC P-256, one day) for loopback tests; PEM in, PEM out."""

    def __init__(self, name: str = "callingest test CA") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (self._builder(subject, subject, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(
                         digital_signature=False, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, self._hash()))

    @staticmethod
    def _hash() -> Any:
        from cryptography.hazmat.primitives import hashes

        return hashes.SHA256()

    @staticmethod
    def _builder(subject: Any, issuer: Any, public_key: Any) -> Any:
        from cryptography import x509

        now = datetime.datetime.now(datetime.UTC)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def cert_pem(self) -> str:
        from cryptography.hazmat.primitives import serialization

        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue_server(self) -> str:
        """A server certificate for 127.0.0.1 and localhost: its unencrypted PKCS#8 key and
        the chain (leaf, CA) in one PEM text, as Kafka's PEM keystore file takes it."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        cert = (self._builder(subject, self.cert.subject, key.public_key())
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                    critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(self.key, self._hash()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        return key_pem + cert.public_bytes(serialization.Encoding.PEM).decode() + self.cert_pem()


@dataclass
class KafkaCluster:
    run_dir: Path
    ports: list[int]
    controller_ports: list[int]
    sasl: Sasl | None = None
    tls: Tls | None = None
    heap: str = "384m"
    pids: dict[int, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.ports)

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def bootstrap_for(self, protocol: str) -> str:
        """The bootstrap servers of the listeners speaking ``protocol``."""
        ports = {"PLAINTEXT": self.ports,
                 "SASL_PLAINTEXT": self.sasl.ports if self.sasl else [],
                 "SSL": self.tls.ports if self.tls else [],
                 "SASL_SSL": self.tls.sasl_ports if self.tls and self.sasl else []}[protocol]
        assert ports, f"no {protocol} listener"
        return ",".join(f"127.0.0.1:{p}" for p in ports)

    @property
    def ca_file(self) -> Path:
        """The CA certificate (PEM) that signed the brokers' TLS certificate."""
        return self.run_dir / "ca.pem"

    def _make_certificates(self) -> None:
        ca = CertificateAuthority()
        self.ca_file.write_text(ca.cert_pem())
        keystore = self.run_dir / "broker-keystore.pem"
        keystore.write_text(ca.issue_server())
        keystore.chmod(0o600)

    def node_dir(self, node: int) -> Path:
        return self.run_dir / f"kafka-{node}"

    def _jvm(self, node: int) -> list[str]:
        java = shutil.which("java") or "java"
        return [java, f"-Xmx{self.heap}", "-Xms128m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                "-XX:TieredStopAtLevel=1", "-Xshare:auto", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={ROOT / 'deploy' / 'kafka' / 'log4j2.yaml'}",
                f"-Dkafka.logs.dir={self.node_dir(node) / 'logs'}", "-cp", f"{LIBS}/*"]

    def _config(self, node: int) -> str:
        i = node - 1
        n = self.size
        voters = ",".join(f"{k + 1}@127.0.0.1:{c}" for k, c in enumerate(self.controller_ports))
        listeners = [f"PLAINTEXT://127.0.0.1:{self.ports[i]}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        lines = []
        secured: dict[str, int] = {}
        if self.sasl is not None:
            secured["SASL_PLAINTEXT"] = self.sasl.ports[i]
        if self.tls is not None:
            secured["SSL"] = self.tls.ports[i]
            if self.sasl is not None and self.tls.sasl_ports:
                secured["SASL_SSL"] = self.tls.sasl_ports[i]
            lines += ["ssl.keystore.type=PEM",
                      f"ssl.keystore.location={self.run_dir / 'broker-keystore.pem'}",
                      "ssl.client.auth=none"]
        for name, port in secured.items():
            listeners.append(f"{name}://127.0.0.1:{port}")
            protocols.append(f"{name}:{name}")
            if self.sasl is not None and name.startswith("SASL_"):
                listener = name.lower()
                lines += [
                    f"listener.name.{listener}.plain.sasl.jaas.config="
                    "org.apache.kafka.common.security.plain.PlainLoginModule required "
                    f'user_{self.sasl.username}="{self.sasl.password}";',
                    f"listener.name.{listener}.scram-sha-512.sasl.jaas.config="
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                ]
        if self.sasl is not None:
            lines.append(f"sasl.enabled.mechanisms={','.join(self.sasl.mechanisms)}")
        advertised = ",".join(listeners)
        replicas = min(3, n)
        return "\n".join([
            "process.roles=broker,controller",
            f"node.id={node}",
            f"controller.quorum.voters={voters}",
            f"listeners={advertised},CONTROLLER://127.0.0.1:{self.controller_ports[i]}",
            f"advertised.listeners={advertised}",
            "controller.listener.names=CONTROLLER",
            f"listener.security.protocol.map={','.join(protocols)}",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={self.node_dir(node) / 'data'}",
            "num.partitions=3",
            "auto.create.topics.enable=false",
            f"default.replication.factor={replicas}",
            f"min.insync.replicas={2 if replicas >= 3 else 1}",
            f"offsets.topic.replication.factor={replicas}",
            "offsets.topic.num.partitions=10",
            f"transaction.state.log.replication.factor={replicas}",
            f"transaction.state.log.min.isr={2 if replicas >= 3 else 1}",
            f"share.coordinator.state.topic.replication.factor={replicas}",
            f"share.coordinator.state.topic.min.isr={2 if replicas >= 3 else 1}",
            "group.initial.rebalance.delay.ms=0",
            "unclean.leader.election.enable=false",
            "log.segment.bytes=67108864",
            *lines,
        ]) + "\n"

    def _format(self, node: int, cluster_id: str) -> None:
        conf = self.node_dir(node) / "server.properties"
        args = [*self._jvm(node), "kafka.tools.StorageTool", "format", "-t", cluster_id,
                "-c", str(conf), "--ignore-formatted"]
        if self.sasl is not None and "SCRAM-SHA-512" in self.sasl.mechanisms:
            args += ["--add-scram",
                     f"SCRAM-SHA-512=[name={self.sasl.username},password={self.sasl.password}]"]
        subprocess.run(args, check=True, capture_output=True, text=True, timeout=120)

    def up(self, timeout: float = 120.0) -> None:
        """Configure, format (first time) and start every node; wait until all answer."""
        cluster_id = None
        if self.tls is not None and not self.ca_file.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._make_certificates()
        for node in range(1, self.size + 1):
            directory = self.node_dir(node)
            (directory / "data").mkdir(parents=True, exist_ok=True)
            (directory / "server.properties").write_text(self._config(node))
            if not (directory / "data" / "meta.properties").exists():
                if cluster_id is None:
                    cluster_id = subprocess.run(
                        [*self._jvm(node), "kafka.tools.StorageTool", "random-uuid"],
                        check=True, capture_output=True, text=True, timeout=120).stdout.strip()
                self._format(node, cluster_id)
        for node in range(1, self.size + 1):
            self.start(node, wait=False)
        self.wait_ready(timeout)

    def start(self, node: int, wait: bool = True, timeout: float = 120.0) -> None:
        """Start one node (its data and config already there)."""
        directory = self.node_dir(node)
        with open(directory / "kafka.log", "ab") as log:
            proc = subprocess.Popen(
                [*self._jvm(node), "kafka.Kafka", str(directory / "server.properties")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self.pids[node] = proc.pid
        (directory / "pid").write_text(str(proc.pid))
        if wait:
            self.wait_ready(timeout, nodes=[node])

    def wait_ready(self, timeout: float, nodes: list[int] | None = None) -> None:
        """Until every node of ``nodes`` (default all) answers metadata requests."""
        deadline = time.monotonic() + timeout
        for node in nodes or range(1, self.size + 1):
            port = self.ports[node - 1]
            while not devstack.kafka_ready(devstack.Ports(kafka=port)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kafka node {node} not ready after {timeout:.0f} s:\n"
                                       + devstack._tail(self.node_dir(node) / "kafka.log"))
                time.sleep(0.5)

    def _pid(self, node: int) -> int | None:
        try:
            return int((self.node_dir(node) / "pid").read_text())
        except (OSError, ValueError):
            return None

    def kill9(self, node: int) -> None:
        """SIGKILL one node at once; waits until its port is closed."""
        self._signal(node, signal.SIGKILL, 0.0)

    def stop(self, node: int, timeout: float = 30.0) -> None:
        """SIGTERM one node (SIGKILL after ``timeout``)."""
        self._signal(node, signal.SIGTERM, timeout)

    def _signal(self, node: int, sig: int, timeout: float) -> None:
        pid = self._pid(node)
        if pid is None:
            return
        devstack._signal_group(pid, sig)
        deadline = time.monotonic() + timeout
        while devstack._alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if devstack._alive(pid):
            devstack._signal_group(pid, signal.SIGKILL)
            while devstack._alive(pid):
                time.sleep(0.05)
        (self.node_dir(node) / "pid").unlink(missing_ok=True)
        port = self.ports[node - 1]
        while devstack.port_open(port):
            time.sleep(0.1)

    def down(self) -> None:
        for node in range(1, self.size + 1):
            self.stop(node, timeout=20.0)


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kafka_cluster", description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("ports", type=_ports)
    parser.add_argument("controller_ports", type=_ports)
    args = parser.parse_args(argv)
    cluster = KafkaCluster(args.run_dir, args.ports, args.controller_ports)
    if args.action == "up":
        cluster.up()
        print(f"kafka cluster of {cluster.size} ready: {cluster.bootstrap}")
    else:
        cluster.down()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("CALLINGEST_ENV", "dev")
    sys.exit(main())
