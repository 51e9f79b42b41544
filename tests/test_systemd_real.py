"""The shipped units under a real systemd 252 (systemd-nspawn): start, reload, restart, stop.

One container per module (tests/nspawn.py). Inside it: three stand-in API servers sharing an
EndpointSlice store (tests/systemd_cluster.py, started as a transient unit), a kubelet-like
identity in root's 0600 files with the shipped kubelet-credentials drop-in, and kubeprism
started with `systemctl` from deploy/systemd.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from certs import TestPKI
from nspawn import REPO_INSIDE, VENV, SystemdContainer
from systemd_node import (
    CONFIG,
    CONFIG_PATH,
    DRAIN_TIMEOUT,
    DROP_IN_DIR,
    KUBELET_CERT,
    KUBELET_CONF,
    PKI,
    SERVERS,
    addresses,
    install_config,
    metric,
    publish,
    rejected,
    restarts,
    scratch_dir,
    start_cluster,
    timed,
    unit_property,
    upstreams,
    write_kubeconfig,
    write_kubelet_cert,
    write_kubelet_identity,
    write_pki,
)
from util import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def box(systemd_box: SystemdContainer, pki: TestPKI) -> Iterator[SystemdContainer]:
    """The module's container with API servers, the node identity, drop-in and config."""
    scratch = scratch_dir(systemd_box)
    write_pki(systemd_box, pki)
    install_config(systemd_box, CONFIG)
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


def test_socket_unit_restarts_a_stopped_service_until_both_are_stopped(
    running: SystemdContainer,
) -> None:
    """What operations.md says: `systemctl stop kubeprism` leaves the socket, and the next
    client starts the service again; stopping both units stops kubeprism."""
    connect = ["curl", "-sk", "-o", "/dev/null", "--max-time", "20", "https://127.0.0.1:7445/"]
    running.run("systemctl", "stop", "kubeprism.service")
    assert unit_property(running, "ActiveState", "kubeprism.socket") == "active"
    running.run(*connect, check=False)
    wait_for(lambda: unit_property(running, "ActiveState") == "active", 30, 0.2, "restarted")
    running.run("systemctl", "stop", "kubeprism.socket", "kubeprism.service")
    refused = running.run(*connect, check=False)
    assert refused.returncode == 7, refused  # curl: failed to connect
    assert unit_property(running, "ActiveState") == "inactive"
    running.run("systemctl", "start", "kubeprism.socket", "kubeprism.service", timeout=60)


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
    # ExecReload= runs as the dynamic user too: it may signal kubeprism and read its metrics.
    assert running.run("systemctl", "reload", "kubeprism", check=False).returncode == 0


def test_load_credential_copies_are_refreshed_only_by_a_restart(running: SystemdContainer) -> None:
    """LoadCredential= as docs/operations.md describes it: `check-config` before the start
    cannot see the path, the service reads systemd's copy, and a changed source reaches the
    service only with a restart (a reload keeps the old copy).

    Before, the docs promised that such a file was re-read on every request.
    """
    cred = "/run/credentials/kubeprism.service/probe-ca"
    source = "/etc/kubeprism/probe-ca.pem"
    drop_in = f"{DROP_IN_DIR}/probe-ca.conf"
    config = running.run("cat", CONFIG_PATH).stdout
    running.sh(
        f"install -m 0600 {PKI}/ca.pem {source}\n"
        f"printf '[Service]\\nLoadCredential=probe-ca:{source}\\n' > {drop_in}\n"
        "systemctl daemon-reload\n"
    )
    try:
        install_config(running, config.replace(f"{PKI}/ca.pem", cred))
        early = running.run("kubeprism", "check-config", check=False)
        assert early.returncode == 2, early
        assert "healthCheck.caFile" in early.stderr, early.stderr
        running.run("systemctl", "restart", "kubeprism.service", timeout=60)
        wait_for(lambda: unit_property(running, "ActiveState") == "active", 30, 0.2, "active")
        original = running.run("cat", cred).stdout
        assert original == running.run("cat", source).stdout
        running.sh(f"printf '\\n' >> {source}\n")  # the source is rotated
        assert running.run("systemctl", "reload", "kubeprism", check=False).returncode == 0
        assert running.run("cat", cred).stdout == original  # a reload keeps the old copy
        running.run("systemctl", "restart", "kubeprism.service", timeout=60)
        wait_for(lambda: unit_property(running, "ActiveState") == "active", 30, 0.2, "active")
        assert running.run("cat", cred).stdout == original + "\n"
    finally:
        running.sh(f"rm -f {drop_in} {source}\nsystemctl daemon-reload\n")
        install_config(running, config)
        running.run("systemctl", "restart", "kubeprism.service", timeout=60)
