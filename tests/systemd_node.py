"""A kubeadm-like node inside a systemd container, for the real-systemd tests.

Stand-in API servers (systemd_cluster.py, run as a transient unit), the kubelet's identity
in root's 0600 files, a kubeprism config using it for discovery, and small helpers that
ask the container (systemctl, kubeprism status, /metrics) what happened. Paths are the
ones inside the container; SCRATCH is bound from a host directory (see `scratch_dir`).
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any

from certs import TestPKI
from clients import metric_sample
from nspawn import REPO_INSIDE, VENV, SystemdContainer
from util import wait_for

SCRATCH = "/srv/scratch"
PKI = f"{SCRATCH}/pki"
SERVERS = ("127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14")
CONFIG_PATH = "/etc/kubeprism/kubeprism.yaml"
KUBELET_CONF = "/etc/kubernetes/kubelet.conf"
KUBELET_CERT = "/var/lib/kubelet/pki/kubelet-client-current.pem"
DROP_IN_DIR = "/etc/systemd/system/kubeprism.service.d"
# Long on purpose: a drain held up by kubeprism's own watch would stall clients this long.
DRAIN_TIMEOUT = 10.0
CONFIG = f"""\
listen: ["127.0.0.1:7445", "[::1]:7445"]
upstreams: ["{SERVERS[0]}:6443"]
healthCheck: {{caFile: {PKI}/ca.pem, interval: 500ms, timeout: 400ms}}
drainTimeout: {DRAIN_TIMEOUT:g}s
discovery:
  kubernetes: {{enabled: true, kubeconfig: {KUBELET_CONF}, debounce: 200ms}}
  filters: ["127.0.0.0/8"]  # the API servers share the container's loopback
"""


# ---------------------------------------------------------------------------------------------
# Helpers (each runs a command inside the container)


def upstreams(box: SystemdContainer) -> dict[str, Any]:
    """kubeprism's /upstreams document."""
    doc: dict[str, Any] = json.loads(box.run("kubeprism", "status", "-o", "json").stdout)
    return doc


def addresses(box: SystemdContainer) -> set[str]:
    """The endpoints kubeprism knows."""
    return {ep["address"] for ep in upstreams(box)["endpoints"]}


def unit_property(box: SystemdContainer, name: str, unit: str = "kubeprism.service") -> str:
    """One property of a unit (`systemctl show -P`)."""
    return box.run("systemctl", "show", "-P", name, unit).stdout.strip()


def timed(box: SystemdContainer, *argv: str) -> tuple[int, float]:
    """Run a command inside; return its exit status and how long it took."""
    started = time.monotonic()
    rc = box.run(*argv, check=False, timeout=120).returncode
    return rc, time.monotonic() - started


def write_kubelet_cert(
    box: SystemdContainer, pki: TestPKI, scratch: Path, lifetime: float = 86400.0
) -> float:
    """Issue the node's client certificate and replace kubelet-client-current.pem with it
    atomically (as the kubelet rotates it); returns when it expires (time.time() scale).
    """
    not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=lifetime)
    node = pki.ca.issue_cert(
        "node1",
        common_name="system:node:node1",
        organization_name="system:nodes",
        not_after=not_after,
    )
    pem = b"".join(b.bytes() for b in node.cert_chain_pems) + node.private_key_pem.bytes()
    (scratch / "kubelet-client.pem").write_bytes(pem)
    box.sh(
        f"install -D -m 0600 {SCRATCH}/kubelet-client.pem {KUBELET_CERT}.new\n"
        f"mv {KUBELET_CERT}.new {KUBELET_CERT}\n"
    )
    # X.509 times have whole seconds: the certificate is invalid from this second on.
    return float(int(not_after.timestamp()))


def write_kubeconfig(
    box: SystemdContainer, target: str, cert: str = KUBELET_CERT, mode: str = "0600"
) -> None:
    """A kubeadm-like node kubeconfig at `target` using the client certificate+key `cert`."""
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubernetes",
                "cluster": {"certificate-authority": f"{PKI}/ca.pem", "server": "https://x:6443"},
            }
        ],
        "contexts": [{"name": "node", "context": {"cluster": "kubernetes", "user": "node"}}],
        "current-context": "node",
        "users": [
            {
                "name": "node",
                "user": {"client-certificate": cert, "client-key": cert},
            }
        ],
    }
    (scratch_dir(box) / "kubeconfig").write_text(json.dumps(kubeconfig))
    box.run("install", "-D", "-m", mode, f"{SCRATCH}/kubeconfig", target)


def write_kubelet_identity(box: SystemdContainer, pki: TestPKI, scratch: Path) -> None:
    """A kubeadm-like kubelet.conf and kubelet-client-current.pem, root's 0600 files."""
    write_kubelet_cert(box, pki, scratch)
    write_kubeconfig(box, KUBELET_CONF)


def install_config(box: SystemdContainer, text: str) -> None:
    """Replace /etc/kubeprism/kubeprism.yaml."""
    (scratch_dir(box) / "kubeprism.yaml").write_text(text)
    box.run("install", "-D", "-m", "0644", f"{SCRATCH}/kubeprism.yaml", CONFIG_PATH)


def restarts(box: SystemdContainer) -> int:
    """How often systemd restarted kubeprism (Restart=always)."""
    return int(unit_property(box, "NRestarts"))


def publish(box: SystemdContainer, count: int) -> None:
    """List the first `count` API servers in the slice; open watches end (kubeprism re-lists)."""
    box.run("curl", "-sf", "-X", "POST", f"http://127.0.0.1:6440/publish?count={count}")


def rejected(box: SystemdContainer) -> int:
    """Slice requests the API servers answered 401 so far."""
    seen: dict[str, int] = json.loads(box.run("curl", "-sf", "http://127.0.0.1:6440/seen").stdout)
    return seen["unauthorized"]


def metric(box: SystemdContainer, name: str, **labels: str) -> float:
    """One sample from kubeprism's /metrics."""
    text = box.run("curl", "-sf", "http://127.0.0.1:7446/metrics").stdout
    return metric_sample(text, name, **labels)


def start_cluster(box: SystemdContainer, python: str = f"{VENV}/bin/python") -> None:
    """The stand-in API servers as a transient unit; returns once they answer."""
    box.run(
        "systemd-run",
        "--unit=apiservers",
        "--quiet",
        python,
        f"{REPO_INSIDE}/tests/systemd_cluster.py",
        "--pki",
        PKI,
        "--servers",
        ",".join(SERVERS),
        "--publish",
        "3",
    )
    wait_for(
        lambda: box.run("curl", "-sf", "http://127.0.0.1:6440/seen", check=False).returncode == 0,
        30,
        0.1,
        "stand-in API servers listening",
    )


def scratch_dir(box: SystemdContainer) -> Path:
    """The host side of SCRATCH."""
    return next(host for host, inside in box.binds.items() if inside == SCRATCH)


def write_pki(box: SystemdContainer, pki: TestPKI) -> None:
    """The test CA and the API servers' certificate at PKI."""
    (scratch_dir(box) / "pki").mkdir()
    for name in ("ca.pem", "server.pem", "server-key.pem"):
        (scratch_dir(box) / "pki" / name).write_bytes((pki.paths.directory / name).read_bytes())
