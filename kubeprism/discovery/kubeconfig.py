"""`kubeprism kubeconfig`: point a kubeconfig's cluster at kubeprism, everything else intact.

Only `server` and `tls-server-name` of the chosen cluster(s) change. Users, contexts,
certificate data, extensions and unknown keys are kept, and so is key order (PyYAML keeps
mapping order; it does not keep comments, which kubeadm-written files do not have).
"""

from __future__ import annotations

import copy
import difflib
import os
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubeprism.base.atomic import read_limited
from kubeprism.base.atomic import write_atomically as write_file
from kubeprism.config.safeyaml import ShallowLoader, yaml_error_text

DEFAULT_KUBECONFIG = "/etc/kubernetes/kubelet.conf"
DEFAULT_SERVER = "https://127.0.0.1:7445"
# A SAN every kube-apiserver certificate carries (kubeadm and most installers add it), so
# clients verify the API servers' own certificates while dialing 127.0.0.1.
DEFAULT_TLS_SERVER_NAME = "kubernetes"
# Values never shown in a diff: credentials of users and auth providers.
SECRET_KEYS = frozenset(
    {
        "client-key-data",
        "token",
        "password",
        "access-token",
        "refresh-token",
        "id-token",
        "client-secret",
    }
)
REDACTED = "<redacted>"
# A kubeconfig with embedded certificates is a few KiB.
MAX_KUBECONFIG_BYTES = 1 << 20


class KubeconfigError(Exception):
    """The kubeconfig cannot be read, is not a kubeconfig, or lacks the wanted cluster."""


@dataclass(frozen=True)
class Change:
    """What happened to one cluster entry."""

    cluster: str
    old_server: str | None
    old_tls_server_name: str | None


@dataclass(frozen=True)
class Rewrite:
    """The result of rewriting one kubeconfig document in memory."""

    old_text: str
    new_text: str
    old_data: dict[str, Any]
    new_data: dict[str, Any]
    changes: list[Change]

    @property
    def changed(self) -> bool:
        """True when the file content would change."""
        return self.old_text != self.new_text


def dump(data: Any) -> str:
    """YAML as kubeadm writes it: block style, insertion order, no line folding."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=2**31)


def load(path: Path) -> tuple[str, dict[str, Any]]:
    """Read and check a kubeconfig file; return its text and its parsed mapping."""
    try:
        text = read_limited(path, MAX_KUBECONFIG_BYTES)
    except FileNotFoundError as exc:
        raise KubeconfigError(f"{path}: no such file") from exc
    except OSError as exc:
        raise KubeconfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise KubeconfigError(f"{path}: not UTF-8 text: {exc}") from exc
    try:
        data = yaml.load(text, Loader=ShallowLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        # Not str(exc): PyYAML quotes the offending line, which may hold a token.
        raise KubeconfigError(f"{path}: {yaml_error_text(exc)}") from None
    if not isinstance(data, dict):
        raise KubeconfigError(f"{path}: not a kubeconfig (expected a YAML mapping)")
    if data.get("kind", "Config") != "Config":
        raise KubeconfigError(f"{path}: not a kubeconfig (kind is {data['kind']!r}, not Config)")
    clusters = data.get("clusters")
    if not isinstance(clusters, list) or not clusters:
        raise KubeconfigError(f"{path}: not a kubeconfig (no 'clusters' list)")
    for i, entry in enumerate(clusters):
        if not isinstance(entry, dict) or not isinstance(entry.get("cluster"), dict):
            raise KubeconfigError(f"{path}: clusters[{i}] has no 'cluster' mapping")
    return text, data


@dataclass(frozen=True)
class Current:
    """What the current context names: its cluster (by name) and user, as mappings."""

    cluster_name: str
    cluster: Mapping[str, Any]
    user: Mapping[str, Any]


def current(data: Mapping[str, Any]) -> Current:
    """The current context's cluster and user: current-context, else the only context.

    The one rule for discovery's credentials and for `kubeprism kubeconfig`, so one file
    never resolves to two different clusters.
    """
    contexts = {
        c.get("name"): c.get("context") or {}
        for c in data.get("contexts") or []
        if isinstance(c, dict)
    }
    name = data.get("current-context") or (next(iter(contexts)) if len(contexts) == 1 else None)
    if name not in contexts:
        have = ", ".join(str(n) for n in contexts) or "none"
        raise KubeconfigError(f"no usable current-context (contexts here: {have})")
    context = contexts[name]
    clusters = {c.get("name"): c.get("cluster") for c in data["clusters"]}
    cluster_name = context.get("cluster") if isinstance(context, dict) else None
    if cluster_name not in clusters:
        raise KubeconfigError(f"context {name!r} names no cluster of this file")
    users = {
        u.get("name"): u.get("user") or {} for u in data.get("users") or [] if isinstance(u, dict)
    }
    return Current(str(cluster_name), clusters[cluster_name], users.get(context.get("user"), {}))


def check_server(server: str) -> None:
    """The new server must be an https URL with a host (kubeprism passes TLS through)."""
    parts = urllib.parse.urlsplit(server)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise KubeconfigError(f"--server {server!r}: expected https://HOST:PORT")


def _cluster_names(data: dict[str, Any], wanted: list[str]) -> list[str]:
    names = [str(entry.get("name")) for entry in data["clusters"]]
    if wanted:
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise KubeconfigError(
                f"cluster {', '.join(unknown)} not found (clusters here: {', '.join(names)})"
            )
        return wanted
    try:
        return [current(data).cluster_name]
    except KubeconfigError as exc:
        raise KubeconfigError(f"{exc}: choose a cluster with --cluster") from exc


def _set_endpoint(cluster: dict[str, Any], server: str, tls_server_name: str) -> dict[str, Any]:
    # Rebuild the mapping so a new tls-server-name lands right after server, as kubectl writes it.
    result: dict[str, Any] = {}
    for key, value in cluster.items():
        if key == "tls-server-name":
            continue
        result[key] = server if key == "server" else value
        if key == "server" and tls_server_name:
            result["tls-server-name"] = tls_server_name
    if "server" not in result:
        result["server"] = server
        if tls_server_name:
            result["tls-server-name"] = tls_server_name
    return result


def rewrite(
    path: Path, server: str, tls_server_name: str, clusters: list[str] | None = None
) -> Rewrite:
    """Compute the rewritten kubeconfig without touching the file."""
    check_server(server)
    old_text, old_data = load(path)
    new_data = copy.deepcopy(old_data)
    changes = []
    for name in _cluster_names(old_data, clusters or []):
        for entry in new_data["clusters"]:
            if entry.get("name") == name:
                old = entry["cluster"]
                changes.append(Change(name, old.get("server"), old.get("tls-server-name")))
                entry["cluster"] = _set_endpoint(old, server, tls_server_name)
    unchanged = new_data == old_data
    new_text = old_text if unchanged else dump(new_data)
    return Rewrite(old_text, new_text, old_data, new_data, changes)


def redact(data: Any) -> Any:
    """A copy with every secret value replaced by a placeholder."""
    if isinstance(data, dict):
        return {k: REDACTED if k in SECRET_KEYS else redact(v) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data


def diff(result: Rewrite, label: str) -> str:
    """A unified diff of the change with secrets redacted (computed on the parsed content)."""
    old = dump(redact(result.old_data)).splitlines(keepends=True)
    new = dump(redact(result.new_data)).splitlines(keepends=True)
    if not result.changed:
        return ""
    label = label.lstrip("/")
    return "".join(difflib.unified_diff(old, new, f"a/{label}", f"b/{label}"))


def layout_preserved(result: Rewrite) -> bool:
    """True when the original text is exactly what PyYAML writes (so the diff is literal)."""
    return result.old_text == dump(result.old_data)


def write_atomically(target: Path, text: str, mode_from: Path) -> None:
    """Write via a temp file in the target's directory: fsync, keep mode/owner, rename."""
    target = Path(os.path.realpath(target))  # replace the file a symlink points to, not the link
    try:
        st = os.stat(target if target.exists() else mode_from)
    except OSError as exc:
        raise KubeconfigError(f"{mode_from}: cannot stat: {exc.strerror or exc}") from exc
    write_file(target, text, stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid))
