"""Credentials for EndpointSlice discovery, re-read when their files change.

From a kubeconfig (the kubelet's is typical: its client certificate is rotated in
place) or a service-account token file plus caFile. Every file they come from is
fingerprinted by content, so the watcher can cheaply check before each request
whether a rotation happened and load the new material. Never logged.
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeprism.base.atomic import read_limited
from kubeprism.config import ConfigError, KubernetesDiscoveryConfig, file_named_by
from kubeprism.discovery import kubeconfig

_KEY = "discovery.kubernetes"
# A service-account token is ~1 KiB: a file much bigger is not a token.
MAX_TOKEN_BYTES = 64 * 1024


@dataclass(frozen=True)
class Credentials:
    """How to reach and authenticate to the API through kubeprism."""

    ssl: ssl.SSLContext
    server_name: str
    token: str | None = None
    token_file: str | None = None
    # Where they came from, to re-read them when the files change (rotation).
    source: KubernetesDiscoveryConfig | None = None
    files: tuple[str, ...] = ()
    fingerprint: str = ""

    def changed_on_disk(self) -> bool:
        """True when a file these credentials were read from now has other content."""
        return self.source is not None and fingerprint(self.files) != self.fingerprint

    def headers(self) -> dict[str, str]:
        """Authorization header; a token file is re-read so rotated tokens are picked up."""
        token = self.token
        if self.token_file is not None:
            token = read_limited(self.token_file, MAX_TOKEN_BYTES).strip()
        return {"Authorization": f"Bearer {token}"} if token else {}


def fingerprint(files: Iterable[str]) -> str:
    """A digest of the files' content (they are small: certificates, keys, a kubeconfig)."""
    digest = hashlib.sha256()
    for name in files:
        try:
            digest.update(name.encode() + b"\0" + Path(name).read_bytes() + b"\0")
        except OSError as exc:
            digest.update(name.encode() + b"\0!" + str(exc.errno).encode() + b"\0")
    return digest.hexdigest()


def load_credentials(kc: KubernetesDiscoveryConfig) -> Credentials:
    """Credentials from the config: a kubeconfig, or a token file plus caFile."""
    with file_named_by(f"{_KEY}.caFile", kc.ca_file):
        ctx = ssl.create_default_context(cafile=kc.ca_file)
    if kc.kubeconfig is None:
        files = tuple(f for f in (kc.ca_file, kc.token_file) if f)
        stamp = fingerprint(files)
        return Credentials(ctx, kc.server_name, None, kc.token_file, kc, files, stamp)
    return _from_kubeconfig(kc, ctx)


def _from_kubeconfig(kc: KubernetesDiscoveryConfig, ctx: ssl.SSLContext) -> Credentials:
    assert kc.kubeconfig is not None
    key = f"{_KEY}.kubeconfig"
    base = Path(kc.kubeconfig).parent
    try:
        _, doc = kubeconfig.load(Path(kc.kubeconfig))
        chosen = kubeconfig.current(doc)
    except kubeconfig.KubeconfigError as exc:
        raise ConfigError(key, f"cannot use kubeconfig {exc}") from None
    cluster, user = chosen.cluster, chosen.user
    files = _files(kc, cluster, user, base)
    # Taken before the TLS material is read: a file replaced meanwhile is read again later.
    stamp = fingerprint(files)
    try:
        if kc.ca_file is None:
            _load_ca(ctx, cluster, base)
        _load_client_cert(ctx, user, base)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(key, f"bad TLS material in {kc.kubeconfig}: {exc}") from None
    token_file = user.get("tokenFile")
    return Credentials(
        ctx,
        cluster.get("tls-server-name") or kc.server_name,
        token=user.get("token"),
        token_file=str(base / token_file) if token_file else None,
        source=kc,
        files=files,
        fingerprint=stamp,
    )


def _files(
    kc: KubernetesDiscoveryConfig, cluster: Mapping[str, Any], user: Mapping[str, Any], base: Path
) -> tuple[str, ...]:
    """Every file the credentials are read from (a kubelet's cert and key are one file)."""
    named = [kc.kubeconfig, kc.ca_file, cluster.get("certificate-authority")]
    named += [user.get(k) for k in ("client-certificate", "client-key", "tokenFile")]
    return tuple(dict.fromkeys(str(base / f) for f in named if isinstance(f, str) and f))


def _load_ca(ctx: ssl.SSLContext, cluster: Mapping[str, Any], base: Path) -> None:
    if data := cluster.get("certificate-authority-data"):
        ctx.load_verify_locations(cadata=base64.b64decode(data).decode())
    elif path := cluster.get("certificate-authority"):
        ctx.load_verify_locations(cafile=str(base / path))


def _load_client_cert(ctx: ssl.SSLContext, user: Mapping[str, Any], base: Path) -> None:
    cert, key = user.get("client-certificate-data"), user.get("client-key-data")
    if cert and key:
        # ssl loads certificates from files only: a private temp dir, removed at once.
        with tempfile.TemporaryDirectory(prefix="kubeprism-") as tmp:
            cert_path, key_path = Path(tmp, "c.pem"), Path(tmp, "k.pem")
            for path, data in ((cert_path, cert), (key_path, key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(base64.b64decode(data))
            ctx.load_cert_chain(cert_path, key_path)
    elif user.get("client-certificate") and user.get("client-key"):
        ctx.load_cert_chain(base / user["client-certificate"], base / user["client-key"])
