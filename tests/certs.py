"""Test PKI built on trustme: a CA, a kube-apiserver-like server cert, a wrong CA, a client cert."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

# The names a real kube-apiserver certificate carries that matter to clients on a node:
# kubectl's --tls-server-name, in-cluster clients, and the loopback address kubeprism binds.
SERVER_SANS = ("kubernetes", "kubernetes.default.svc", "localhost", "127.0.0.1", "::1")
# Kubernetes maps the client certificate's CN to a user and O to groups.
CLIENT_CN = "system:kubeprism"
CLIENT_ORG = "system:nodes"


@dataclass(frozen=True)
class PKIPaths:
    """PEM files written by TestPKI.create(); server cert files hold the full chain."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    wrong_ca: Path
    wrong_server_cert: Path
    wrong_server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class TestPKI:
    """Certificates for one test session, already written to `paths.directory`."""

    __test__ = False  # the name starts with "Test"; keep pytest from collecting it

    ca: trustme.CA
    server: trustme.LeafCert
    wrong_ca: trustme.CA
    wrong_server: trustme.LeafCert
    client: trustme.LeafCert
    paths: PKIPaths

    @classmethod
    def create(cls, directory: Path) -> TestPKI:
        """Generate fresh CAs and leaves and write them as PEM files into `directory`."""
        ca = trustme.CA(organization_name="kubeprism test CA")
        wrong_ca = trustme.CA(organization_name="kubeprism unrelated CA")
        server = ca.issue_cert(*SERVER_SANS, common_name="kube-apiserver")
        wrong_server = wrong_ca.issue_cert(*SERVER_SANS, common_name="kube-apiserver")
        client = ca.issue_cert(
            "kubeprism.invalid", common_name=CLIENT_CN, organization_name=CLIENT_ORG
        )
        paths = _write(directory, ca, server, wrong_ca, wrong_server, client)
        return cls(ca, server, wrong_ca, wrong_server, client, paths)

    def server_context(
        self, *, wrong: bool = False, require_client_cert: bool = False
    ) -> ssl.SSLContext:
        """Server-side context presenting the server leaf (or the wrong CA's leaf)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # Pin HTTP/1.1: Go clients would otherwise offer h2, which the stand-in does not speak.
        ctx.set_alpn_protocols(["http/1.1"])
        if wrong:
            ctx.load_cert_chain(self.paths.wrong_server_cert, self.paths.wrong_server_key)
        else:
            ctx.load_cert_chain(self.paths.server_cert, self.paths.server_key)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=self.paths.ca)
        return ctx

    def client_context(
        self, *, trust_wrong_ca: bool = False, with_client_cert: bool = False
    ) -> ssl.SSLContext:
        """Client-side context trusting the test CA (or only the wrong one), hostname checked."""
        ctx = ssl.create_default_context(
            cafile=self.paths.wrong_ca if trust_wrong_ca else self.paths.ca
        )
        if with_client_cert:
            ctx.load_cert_chain(self.paths.client_cert, self.paths.client_key)
        return ctx


def write_pki(directory: Path) -> PKIPaths:
    """Create a fresh test PKI in `directory` and return the file paths (for scripts/benches)."""
    directory.mkdir(parents=True, exist_ok=True)
    return TestPKI.create(directory).paths


def _write(
    directory: Path,
    ca: trustme.CA,
    server: trustme.LeafCert,
    wrong_ca: trustme.CA,
    wrong_server: trustme.LeafCert,
    client: trustme.LeafCert,
) -> PKIPaths:
    paths = PKIPaths(
        directory=directory,
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        wrong_ca=directory / "wrong-ca.pem",
        wrong_server_cert=directory / "wrong-server.pem",
        wrong_server_key=directory / "wrong-server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
    )
    ca.cert_pem.write_to_path(paths.ca)
    wrong_ca.cert_pem.write_to_path(paths.wrong_ca)
    _write_leaf(server, paths.server_cert, paths.server_key)
    _write_leaf(wrong_server, paths.wrong_server_cert, paths.wrong_server_key)
    _write_leaf(client, paths.client_cert, paths.client_key)
    return paths


def _write_leaf(leaf: trustme.LeafCert, cert_path: Path, key_path: Path) -> None:
    cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(key_path)
    # Keys are secrets even in tests; some tools (and reviewers) complain about world-readable keys.
    key_path.chmod(0o600)
