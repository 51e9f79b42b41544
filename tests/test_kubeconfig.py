"""`kubeprism kubeconfig`: rewrite a realistic kubeconfig, use it with kubectl through kubeprism."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from certs import TestPKI
from daemon_proc import REPO, DaemonProcess, base_config
from util import free_port, kubectl_path, run_kubectl

from kubeprism.config import KubernetesDiscoveryConfig
from kubeprism.discovery import kubeconfig as kc
from kubeprism.discovery.credentials import load_credentials

TIMEOUT = 20.0
TOKEN = "s3cr3t-node-token-0123456789"
KEY_DATA = base64.b64encode(b"-----BEGIN EC PRIVATE KEY-----\nnot-a-real-key\n").decode()
PASSWORD = "hunter2-basic-auth"
SECRETS = (TOKEN, KEY_DATA, PASSWORD)


def realistic(server: str, ca_pem: bytes) -> dict[str, Any]:
    """A kubeadm-style kubelet.conf plus what other tools add (extensions, unknown keys)."""
    ca_data = base64.b64encode(ca_pem).decode()
    return {
        "apiVersion": "v1",
        "clusters": [
            {
                "cluster": {
                    "certificate-authority-data": ca_data,
                    "server": server,
                    "extensions": [{"name": "example.com/meta", "extension": {"zone": "a"}}],
                },
                "name": "kubernetes",
            },
            {"cluster": {"server": "https://10.9.9.9:6443"}, "name": "other"},
        ],
        "contexts": [
            {
                "context": {"cluster": "kubernetes", "user": "system:node:node1"},
                "name": "system:node:node1@kubernetes",
            },
            {"context": {"cluster": "other", "user": "basic"}, "name": "other"},
        ],
        "current-context": "system:node:node1@kubernetes",
        "kind": "Config",
        "preferences": {},
        "users": [
            {"name": "system:node:node1", "user": {"token": TOKEN}},
            {"name": "basic", "user": {"username": "admin", "password": PASSWORD}},
        ],
        "x-vendor-setting": {"keep": ["me", 1, True]},
    }


def write(path: Path, data: dict[str, Any], mode: int = 0o600) -> Path:
    """Write a kubeconfig with the given mode."""
    path.write_text(kc.dump(data))
    path.chmod(mode)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `kubeprism kubeconfig` synchronously."""
    return subprocess.run(
        [sys.executable, "-m", "kubeprism", "kubeconfig", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        check=False,
    )


async def acli(*args: str) -> subprocess.CompletedProcess[str]:
    """cli() off the event loop (in-process stand-ins keep answering meanwhile)."""
    return await asyncio.to_thread(cli, *args)


async def kubectl_version(kubeconfig: Path, home: Path) -> tuple[int, str, str]:
    """`kubectl.1.33 --kubeconfig F get --raw /version`."""
    argv = [kubectl_path(), "--kubeconfig", str(kubeconfig), "get", "--raw", "/version"]
    return await run_kubectl([*argv, "--request-timeout", "10s"], home)


# ------------------------------------------------------------------ rewrite + kubectl


async def test_rewritten_kubeconfig_works_with_kubectl_through_kubeprism(
    pki: TestPKI, standin_factory: Any, tmp_path: Path
) -> None:
    api = await standin_factory("A")
    # 127.0.0.2 is loopback but not a SAN of the API server certificate: kubectl verifies
    # only because tls-server-name says "kubernetes", like a node dialing 127.0.0.1 would.
    listen = f"127.0.0.2:{free_port('127.0.0.2')}"
    hc = {"caFile": str(pki.paths.ca), "serverName": "kubernetes"}
    cfg = base_config([f"127.0.0.1:{api.port}"], healthCheck=hc, listen=[listen])
    daemon = await DaemonProcess(cfg, tmp_path).astart()
    try:
        await daemon.await_state(f"127.0.0.1:{api.port}", "healthy")
        original = realistic(f"https://127.0.0.1:{api.port}", pki.paths.ca.read_bytes())
        path = write(tmp_path / "kubelet.conf", original)

        result = await acli("--kubeconfig", str(path), "--server", f"https://{listen}")
        assert result.returncode == 0, result.stderr
        assert "cluster 'kubernetes'" in result.stderr
        assert all(secret not in result.stderr + result.stdout for secret in SECRETS)

        rewritten = yaml.safe_load(path.read_text())
        cluster = rewritten["clusters"][0]["cluster"]
        assert list(cluster) == [
            "certificate-authority-data",
            "server",
            "tls-server-name",
            "extensions",
        ]
        assert cluster["server"] == f"https://{listen}"
        assert cluster["tls-server-name"] == "kubernetes"
        expected = json.loads(json.dumps(original))
        expected["clusters"][0]["cluster"] = cluster
        assert rewritten == expected  # nothing else moved, including the other cluster
        assert list(rewritten) == list(original)

        rc, out, err = await kubectl_version(path, tmp_path)
        assert rc == 0, err
        assert json.loads(out)["standin"] == "A"
        upstreams = await daemon.aupstreams()
        assert upstreams[f"127.0.0.1:{api.port}"]["connectionsTotal"] >= 1

        # Without tls-server-name the same certificate does not verify for 127.0.0.2.
        bare = tmp_path / "bare.conf"
        result = await acli(
            "--kubeconfig",
            str(path),
            "--output",
            str(bare),
            "--server",
            f"https://{listen}",
            "--tls-server-name",
            "",
        )
        assert result.returncode == 0, result.stderr
        assert "tls-server-name" not in bare.read_text()
        rc, _, err = await kubectl_version(bare, tmp_path)
        assert rc != 0
        assert "x509" in err or "certificate" in err
    finally:
        await daemon.astop()


# ------------------------------------------------------------------ diff mode


def test_diff_changes_nothing_and_redacts_secrets(tmp_path: Path, pki: TestPKI) -> None:
    data = realistic("https://10.0.0.1:6443", pki.paths.ca.read_bytes())
    # Users before clusters and server first: the token line is context of the diff hunk.
    data["users"][0]["user"] = {"client-key-data": KEY_DATA, "token": TOKEN}
    data["users"].reverse()
    data["clusters"][0]["cluster"] = {"server": "https://10.0.0.1:6443", "insecure": False}
    reordered = {"users": data.pop("users"), "clusters": data.pop("clusters"), **data}
    path = write(tmp_path / "kubelet.conf", reordered)
    before, before_stat = path.read_bytes(), path.stat()

    result = cli("--kubeconfig", str(path), "--diff")
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == before_stat.st_mtime_ns
    assert sorted(os.listdir(tmp_path)) == ["kubelet.conf"]
    out = result.stdout
    label = str(path).lstrip("/")
    assert out.startswith(f"--- a/{label}\n+++ b/{label}\n@@ ")
    assert "\n-    server: https://10.0.0.1:6443\n" in out
    assert "\n+    server: https://127.0.0.1:7445\n" in out
    assert "\n+    tls-server-name: kubernetes\n" in out
    assert "\n     token: <redacted>\n" in out  # context line, value hidden
    assert all(secret not in out + result.stderr for secret in SECRETS)
    assert "layout" not in result.stderr  # written by PyYAML: the diff is literal


def test_diff_warns_when_the_file_would_be_reformatted(tmp_path: Path, pki: TestPKI) -> None:
    path = tmp_path / "kubelet.conf"
    text = kc.dump(realistic("https://10.0.0.1:6443", pki.paths.ca.read_bytes()))
    path.write_text("# written by hand\n" + text)
    result = cli("--kubeconfig", str(path), "--diff")
    assert result.returncode == 0, result.stderr
    assert "drop comments" in result.stderr
    assert "+    tls-server-name: kubernetes" in result.stdout


def test_redact_hides_every_secret_key() -> None:
    data = {
        "users": [
            {"user": {"token": "t", "password": "p", "client-key-data": "k", "username": "u"}},
            {"user": {"auth-provider": {"config": {"id-token": "i", "refresh-token": "r"}}}},
        ]
    }
    text = kc.dump(kc.redact(data))
    assert text.count(kc.REDACTED) == 5
    assert "username: u" in text


# ------------------------------------------------------------------ writing


def test_atomic_write_keeps_mode_and_replaces_the_inode(tmp_path: Path, pki: TestPKI) -> None:
    path = write(tmp_path / "kubelet.conf", realistic("https://10.0.0.1:6443", b"ca"), 0o600)
    inode = path.stat().st_ino
    result = cli("--kubeconfig", str(path))
    assert result.returncode == 0, result.stderr
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_ino != inode  # renamed over, never truncated in place
    assert sorted(os.listdir(tmp_path)) == ["kubelet.conf"]  # no temp file left behind
    assert yaml.safe_load(path.read_text())["clusters"][0]["cluster"]["server"] == (
        "https://127.0.0.1:7445"
    )
    # A second run finds nothing to do and leaves the file alone.
    again = cli("--kubeconfig", str(path))
    assert again.returncode == 0, again.stderr
    assert "already points" in again.stderr
    assert path.stat().st_ino == st.st_ino


def test_symlinked_kubeconfig_is_rewritten_through_the_link(tmp_path: Path) -> None:
    real = write(tmp_path / "real.conf", realistic("https://10.0.0.1:6443", b"ca"), 0o640)
    link = tmp_path / "kubelet.conf"
    link.symlink_to(real)
    result = cli("--kubeconfig", str(link), "--cluster", "other", "--server", "https://[::1]:7445")
    assert result.returncode == 0, result.stderr
    assert link.is_symlink()
    data = yaml.safe_load(real.read_text())
    assert data["clusters"][1]["cluster"]["server"] == "https://[::1]:7445"
    assert data["clusters"][0]["cluster"]["server"] == "https://10.0.0.1:6443"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("kubeconfig", ["--cluster", "nope"], "cluster nope not found (clusters here: "),
        (None, [], "no such file"),
        ("listen: [127.0.0.1:7445]\nupstreams: [10.0.0.1:6443]\n", [], "not a kubeconfig"),
        ("kind: Pod\nclusters: []\n", [], "kind is 'Pod'"),
        ("clusters: [\n", [], "not valid YAML"),
        ("clusters: " + "[" * 30000 + "]" * 30000 + "\n", [], "more than 64 levels"),
        ("kubeconfig", ["--server", "http://127.0.0.1:7445"], "expected https://HOST:PORT"),
    ],
)
def test_bad_input_exits_2_and_changes_nothing(
    tmp_path: Path, content: str | None, args: list[str], message: str
) -> None:
    path = tmp_path / "kubelet.conf"
    if content == "kubeconfig":
        write(path, realistic("https://10.0.0.1:6443", b"ca"))
    elif content is not None:
        path.write_text(content)
    before = path.read_bytes() if path.exists() else None
    result = cli("--kubeconfig", str(path), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert (path.read_bytes() if path.exists() else None) == before


def test_discovery_and_the_kubeconfig_command_resolve_the_same_cluster(
    tmp_path: Path, pki: TestPKI
) -> None:
    """Regression: without current-context, discovery took the only *context* (cluster b)
    while the command took the only *cluster* or gave up: one file, two answers."""
    ca_data = base64.b64encode(pki.paths.ca.read_bytes()).decode()
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": c,
                "cluster": {
                    "server": f"https://{c}:6443",
                    "tls-server-name": c,
                    "certificate-authority-data": ca_data,
                },
            }
            for c in ("a", "b")
        ],
        "contexts": [{"name": "only", "context": {"cluster": "b", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": TOKEN}}],
    }
    path = write(tmp_path / "kubelet.conf", doc)
    creds = load_credentials(KubernetesDiscoveryConfig(enabled=True, kubeconfig=str(path)))
    assert creds.server_name == "b"
    result = cli("--kubeconfig", str(path))
    assert result.returncode == 0, result.stderr
    servers = {
        c["name"]: c["cluster"]["server"] for c in yaml.safe_load(path.read_text())["clusters"]
    }
    assert servers == {"a": "https://a:6443", "b": kc.DEFAULT_SERVER}
