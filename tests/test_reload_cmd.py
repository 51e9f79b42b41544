"""`kubeprism reload` (ExecReload=) and `check-config --as-user`, against real processes.

The real-systemd tests run both through systemctl; these need no container.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from daemon_proc import DaemonProcess, base_config
from util import free_port

KUBEPRISM = [sys.executable, "-m", "kubeprism"]


def kubeprism(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a kubeprism command; its result."""
    return subprocess.run(
        [*KUBEPRISM, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_reload_exits_0_when_applied_1_when_rejected_3_when_unknown(tmp_path: Path) -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{upstream.getsockname()[1]}"
    cfg = base_config([address], healthCheck={"type": "tcp"})
    with upstream, DaemonProcess(cfg, tmp_path) as daemon:
        assert daemon.proc is not None
        admin = f"127.0.0.1:{daemon.admin_port}"
        pid = str(daemon.proc.pid)
        good = kubeprism("reload", "--pid", pid, "--admin", admin)
        assert good.returncode == 0, good.stderr
        daemon.config_path.write_text(yaml.safe_dump({**cfg, "dialTimeout": "soon"}))
        bad = kubeprism("reload", "--pid", pid, "--admin", admin)
        assert bad.returncode == 1, bad.stderr
        assert "rejected" in bad.stderr
        assert "dialTimeout" in daemon.log()
        nobody = kubeprism("reload", "--pid", pid, "--admin", f"127.0.0.1:{free_port()}")
        assert nobody.returncode == 3, nobody.stderr


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path sits below a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="kubeprism-as-user-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_check_config_as_user_names_each_file_that_user_cannot_read(open_dir: Path) -> None:
    secret = open_dir / "ca.pem"
    secret.write_text((Path(__file__).parent / "certs.py").read_text())  # any readable text
    secret.chmod(0o600)
    config = open_dir / "kubeprism.yaml"
    config.write_text(yaml.safe_dump({"upstreams": ["127.0.0.1:6443"]}))
    config.chmod(0o644)
    assert kubeprism("check-config", "-c", str(config), "--as-user", "dynamic").returncode == 0
    cfg = {"upstreams": ["127.0.0.1:6443"], "healthCheck": {"type": "tcp", "caFile": str(secret)}}
    config.write_text(yaml.safe_dump(cfg))
    as_root = kubeprism("check-config", "-c", str(config), "--as-user", "root")
    assert as_root.returncode == 0, as_root.stderr  # root owns it: readable without capabilities
    dynamic = kubeprism("check-config", "-c", str(config), "--as-user", "dynamic")
    assert dynamic.returncode == 2
    assert f"{secret} is not readable by user dynamic: Permission denied" in dynamic.stderr
    unknown = kubeprism("check-config", "-c", str(config), "--as-user", "no-such-user-here")
    assert unknown.returncode == 1 and "no such user" in unknown.stderr
