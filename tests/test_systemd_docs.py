"""docs/operations.md's systemd install, steps 1-4, run as written on a fresh Debian 12 node.

A fresh container (real systemd 252, no network, nothing of kubeprism installed) holding
the wheels and a kubeadm-like node: the kubelet's identity in root's 0600 files and three
API servers. The shell blocks of the doc's steps run unchanged, except the `editor` line,
which writes the config a person would have typed. Then discovery must work.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from certs import TestPKI
from nspawn import REPO, VENV, SystemdContainer
from systemd_node import (
    CONFIG,
    CONFIG_PATH,
    SCRATCH,
    SERVERS,
    addresses,
    install_config,
    start_cluster,
    unit_property,
    write_kubelet_identity,
    write_pki,
)
from util import wait_for

pytestmark = pytest.mark.slow

DOC = REPO / "docs" / "operations.md"
SECTION = "## Install as a systemd service, step by step"
WHEELS_PARENT = "/srv/node"  # the doc's commands run in the directory holding `wheels`


def doc_steps() -> list[str]:
    """The shell blocks of steps 1 to 4 of the systemd install, dedented, in order."""
    text = DOC.read_text()
    section = text.split(SECTION, 1)[1].split("\n5. ", 1)[0]
    blocks = re.findall(r"^ *```sh\n(.*?)^ *```", section, flags=re.M | re.S)
    assert len(blocks) >= 4, f"expected the shell blocks of steps 1-4 in {DOC}"
    return [textwrap.dedent(block) for block in blocks]


def as_typed(block: str) -> str:
    """The block with its `editor` line replaced by writing the test's config."""
    edited = re.sub(
        r"^editor (\S+).*$",
        rf"install -m 0644 {SCRATCH}/kubeprism.yaml \1",
        block,
        flags=re.M,
    )
    return f"cd {WHEELS_PARENT}\n{edited}"


@pytest.fixture(scope="module")
def node(
    wheelhouse: Path, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SystemdContainer]:
    """A fresh container: the wheels at WHEELS_PARENT/wheels, the node identity, a scratch dir."""
    scratch = tmp_path_factory.mktemp("scratch")
    binds = {wheelhouse: f"{WHEELS_PARENT}/wheels", scratch: SCRATCH}
    with SystemdContainer(binds=binds, read_only_binds={REPO: "/srv/kubeprism"}) as box:
        write_pki(box, pki)
        write_kubelet_identity(box, pki, scratch)
        (scratch / "kubeprism.yaml").write_text(CONFIG)
        yield box


def test_operations_md_followed_literally_reaches_ready_with_discovery(
    node: SystemdContainer,
) -> None:
    """Steps 1-4 as written: offline install, config, kubelet-credentials drop-in, units."""
    install, *rest = doc_steps()
    node.sh(as_typed(install), timeout=300)
    assert node.run("test", "-x", f"{VENV}/bin/kubeprism", check=False).returncode == 0
    start_cluster(node)  # the node's API servers, with the Python kubeprism brought along
    for block in rest:
        node.sh(as_typed(block), timeout=120)
    assert unit_property(node, "ActiveState") == "active"
    assert unit_property(node, "User") == "root"  # the drop-in from the wheel
    want = {f"{host}:6443" for host in SERVERS[:3]}
    wait_for(lambda: addresses(node) == want, 30, 0.2, f"discovery of {want}")
    assert node.run("kubeprism", "status", check=False).returncode == 0
    documentation = unit_property(node, "Documentation").removeprefix("file://")
    assert node.run("test", "-s", documentation, check=False).returncode == 0, documentation
    install_config(node, CONFIG)  # the doc's day two: reload reports its outcome
    assert node.run("systemctl", "reload", "kubeprism", check=False).returncode == 0
    assert node.run("cat", CONFIG_PATH).stdout == CONFIG
