"""The shipped units under a real systemd 252 (systemd-nspawn): start, reload, restart, stop.

One container per module (tests/nspawn.py). Inside it: three stand-in API servers sharing an
EndpointSlice store (tests/systemd_cluster.py, started as a transient unit), a kubelet-like
identity in root's 0600 files with the shipped kubelet-credentials drop-in, and kubeprism
started with `systemctl` from deploy/systemd.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from certs import TestPKI
from clients import metric_sample
from nspawn import REPO_INSIDE, VENV, SystemdContainer
from util import wait_for

pytestmark = pytest.mark.slow

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


def start_cluster(box: SystemdContainer) -> None:
    """The stand-in API servers as a transient unit; returns once they answer."""
    box.run(
        "systemd-run",
        "--unit=apiservers",
        "--quiet",
        f"{VENV}/bin/python",
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


@pytest.fixture(scope="module")
def box(systemd_box: SystemdContainer, pki: TestPKI) -> Iterator[SystemdContainer]:
    """The module's container with API servers, the node identity, drop-in and config."""
    scratch = scratch_dir(systemd_box)
    (scratch / "pki").mkdir()
    install_config(systemd_box, CONFIG)
    for name in ("ca.pem", "server.pem", "server-key.pem"):
        (scratch / "pki" / name).write_bytes((pki.paths.directory / name).read_bytes())
    write_kubelet_identity(systemd_box, pki, scratch)
    systemd_box.sh(
        f"install -D -m 0644 {REPO_INSIDE}/deploy/systemd/kubeprism.service.d/"
        f"kubelet-credentials.conf {DROP_IN_DIR}/kubelet-credentials.conf\n"
        "systemctl daemon-reload\n"
    )
    start_cluster(systemd_box)
    yield systemd_box


@pytest.fixture(scope="module")
def running(box: SystemdContainer) -> SystemdContainer:
    """kubeprism started (socket and service) and every published API server discovered."""
    box.run("systemctl", "start", "kubeprism.socket", "kubeprism.service", timeout=60)
    want = {f"{host}:6443" for host in SERVERS[:3]}
    try:
        wait_for(lambda: addresses(box) == want, 30, 0.2, f"discovery of {want}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\njournal:\n{box.journal()[-4000:]}") from None
    return box


# ---------------------------------------------------------------------------------------------
# Tests


def test_start_reaches_ready_with_kubelet_identity_and_discovery(running: SystemdContainer) -> None:
    """Type=notify: active once READY=1 was sent; the status line counts healthy endpoints."""
    assert unit_property(running, "ActiveState") == "active"
    assert unit_property(running, "User") == "root"  # the kubelet-credentials drop-in
    wait_for(
        lambda: unit_property(running, "StatusText") == "3/3 endpoints healthy",
        10,
        0.2,
        "status line",
    )
    sources = {ep["address"]: ep["sources"] for ep in upstreams(running)["endpoints"]}
    assert sources[f"{SERVERS[1]}:6443"] == ["kubernetes"]


def test_rotated_client_certificate_is_used_without_restart_or_reload(
    running: SystemdContainer, pki: TestPKI
) -> None:
    """The kubelet's certificate expires and a new one is written: discovery recovers by itself.

    Before, the certificate was loaded once: every list got 401 until a restart.
    """
    main_pid = unit_property(running, "MainPID")
    scratch = scratch_dir(running)
    expires = write_kubelet_cert(running, pki, scratch, lifetime=6)
    publish(running, 3)  # the re-watch reads the short-lived certificate
    wait_for(lambda: time.time() > expires + 0.5, 15, 0.2, "the client certificate expired")
    before = rejected(running)
    publish(running, 4)  # a fourth API server joins; re-listing needs a valid certificate
    wait_for(lambda: rejected(running) > before, 30, 0.2, "a list rejected with 401")
    wait_for(lambda: metric(running, "kubeprism_discovery_errors_total", reason="unauthorized"), 10)
    assert f"{SERVERS[3]}:6443" not in addresses(running)
    renewed = time.monotonic()
    write_kubelet_cert(running, pki, scratch)
    want = {f"{host}:6443" for host in SERVERS}
    wait_for(lambda: addresses(running) == want, 60, 0.2, "the fourth API server discovered")
    print(f"discovered {time.monotonic() - renewed:.1f}s after the new certificate was written")
    assert unit_property(running, "MainPID") == main_pid  # no restart
    assert "Reloading" not in running.journal("kubeprism.service")
    assert "credentials changed on disk" in running.journal()
    assert metric(running, "kubeprism_discovery_last_success_timestamp_seconds") > expires


def test_reload_exit_status_says_whether_the_new_config_was_applied(
    running: SystemdContainer,
) -> None:
    """ExecReload is `kubeprism reload`: `systemctl reload` fails when the config is rejected.

    Before, ExecReload=/bin/kill -HUP returned 0 either way.
    """
    main_pid = unit_property(running, "MainPID")
    try:
        install_config(running, CONFIG + "logLevel: debug\n")
        assert running.run("systemctl", "reload", "kubeprism", check=False).returncode == 0
        install_config(running, CONFIG + "dialTimeout: soon\n")
        bad = running.run("systemctl", "reload", "kubeprism", check=False)
        assert bad.returncode != 0, bad
        assert "dialTimeout" in running.journal()
        assert unit_property(running, "ActiveState") == "active"
        assert unit_property(running, "MainPID") == main_pid
        assert metric(running, "kubeprism_config_reloads_total", result="failure") == 1
    finally:
        install_config(running, CONFIG)
    assert running.run("systemctl", "reload", "kubeprism", check=False).returncode == 0


def test_watchdog_restarts_a_wedged_process(running: SystemdContainer) -> None:
    """WATCHDOG=1 comes from the event loop: a stopped process is killed and restarted."""
    drop_in = f"{DROP_IN_DIR}/watchdog.conf"
    running.sh(f"printf '[Service]\\nWatchdogSec=2s\\n' > {drop_in}\nsystemctl daemon-reload")
    try:
        running.run("systemctl", "restart", "kubeprism.service", timeout=60)
        before, wedged = restarts(running), unit_property(running, "MainPID")
        running.run("kill", "-STOP", wedged)
        wait_for(lambda: restarts(running) > before, 30, 0.2, "a watchdog restart")
        wait_for(lambda: unit_property(running, "ActiveState") == "active", 30, 0.2, "active")
        assert unit_property(running, "MainPID") != wedged
        assert "Watchdog timeout" in running.journal()
    finally:
        running.sh(f"rm -f {drop_in}\nsystemctl daemon-reload")
        running.run("systemctl", "restart", "kubeprism.service", timeout=60)


def test_check_config_as_the_service_user_catches_unreadable_credentials(
    box: SystemdContainer,
) -> None:
    """The kubelet's 0600 files: fine for root (the drop-in), unreadable for a dynamic user.

    Before, check-config (run as root) passed and the unit without the drop-in exited 2
    once a second forever.
    """
    as_root = box.run("kubeprism", "check-config", "--as-user", "root", check=False)
    assert as_root.returncode == 0, as_root.stderr
    dynamic = box.run("kubeprism", "check-config", "--as-user", "dynamic", check=False)
    assert dynamic.returncode == 2, dynamic
    assert f"{KUBELET_CONF} is not readable by user dynamic" in dynamic.stderr


def test_restart_under_load_refuses_nothing_and_does_not_wait_for_the_drain(
    running: SystemdContainer,
) -> None:
    """Clients queue in the socket unit's backlog for the restart only, not for drainTimeout.

    Before, kubeprism's own EndpointSlice watch (through its own listener) held every drain
    for the whole drainTimeout.
    """
    load = running.popen(
        f"{VENV}/bin/python",
        f"{REPO_INSIDE}/tests/systemd_load.py",
        "--ca",
        f"{PKI}/ca.pem",
        "--seconds",
        "30",
        "--stop-file",
        "/run/load.stop",
        stdout=-1,
    )
    try:
        assert load.stdout is not None
        assert load.stdout.readline().strip() == b"STARTED"
        rc, restart_seconds = timed(running, "systemctl", "restart", "kubeprism.service")
        assert rc == 0, running.journal()[-3000:]
        running.run("touch", "/run/load.stop")
        out, _ = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    summary = json.loads(out.decode().splitlines()[-1])
    print(f"restart took {restart_seconds:.2f}s; load: {summary}")
    assert summary["failures"] == 0, summary
    assert summary["requests"] > 0
    # A drain waiting for the watch would show up as a DRAIN_TIMEOUT-long stall.
    assert summary["slowest"] < DRAIN_TIMEOUT / 3, summary
    assert "still open after draining" not in running.journal()


def test_stop_does_not_wait_for_the_drain(running: SystemdContainer) -> None:
    """`systemctl stop` with discovery on returns well within drainTimeout; start again works."""
    rc, seconds = timed(running, "systemctl", "stop", "kubeprism.service")
    print(f"stop took {seconds:.2f}s")
    assert rc == 0
    assert seconds < DRAIN_TIMEOUT / 3
    assert unit_property(running, "ActiveState") == "inactive"
    journal = running.journal()
    assert "still open after draining" not in journal
    assert "ClientPayloadError" not in journal
    running.run("systemctl", "start", "kubeprism.service", timeout=60)
    assert unit_property(running, "ActiveState") == "active"


def test_dynamic_user_keeps_the_endpoint_cache_in_its_state_directory(
    running: SystemdContainer,
) -> None:
    """The shipped unit without the drop-in: a dynamic user, credentials readable by it, and
    the 0600 endpoint cache in StateDirectory= (/var/lib/private/kubeprism)."""
    identity = "/etc/kubeprism/node"
    running.sh(
        f"rm -f {DROP_IN_DIR}/kubelet-credentials.conf\nsystemctl daemon-reload\n"
        f"install -D -m 0644 {KUBELET_CERT} {identity}/client.pem\n"
    )
    write_kubeconfig(running, f"{identity}/kubeconfig", f"{identity}/client.pem", "0644")
    install_config(running, CONFIG.replace(KUBELET_CONF, f"{identity}/kubeconfig"))
    running.run("kubeprism", "check-config", "--as-user", "dynamic")
    running.run("systemctl", "restart", "kubeprism.service", timeout=60)
    user = running.run("ps", "-o", "user=", "-p", unit_property(running, "MainPID")).stdout
    assert user.strip() == "kubeprism"
    uid = int(running.run("id", "-u", "kubeprism").stdout)
    assert 61184 <= uid <= 65519  # systemd's DynamicUser= range
    cache = "/var/lib/private/kubeprism/endpoints.json"
    wait_for(lambda: running.run("test", "-s", cache, check=False).returncode == 0, 30, 0.2)
    assert running.run("stat", "-c", "%a %u", cache).stdout.split() == ["600", str(uid)]
    assert running.run("readlink", "/var/lib/kubeprism").stdout.strip() == "private/kubeprism"
    cached = running.run("cat", cache).stdout
    assert all(host in cached for host in SERVERS), cached
