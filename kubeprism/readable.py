"""`check-config --as-user`: can the service's user read every file the config names?

`check-config` usually runs as root, which reads anything; the shipped unit runs kubeprism
as a dynamic user, which cannot read root's 0600 files (the kubelet's kubeconfig and
client certificate): the service then exits 2 once a second, forever. Reading each file in
a child process running as that user answers the question exactly (modes, ACLs, every
directory on the way), without guessing from permission bits.
"""

from __future__ import annotations

import json
import pwd
import subprocess
import sys
from collections.abc import Iterable

from kubeprism.prepare import Prepared

# What `--as-user dynamic` stands for: an unused uid from systemd's DynamicUser= range
# (61184-65519), with no supplementary groups, as a dynamic user has.
DYNAMIC = "dynamic"
DYNAMIC_UID = 65519
# Opening a handful of files; a hung network file system is the only slow case.
CHILD_TIMEOUT = 30.0
_CHILD = """
import json, sys
problems = {}
for path in json.loads(sys.argv[1]):
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        problems[path] = exc.strerror or str(exc)
print(json.dumps(problems))
"""


class CheckError(Exception):
    """The check itself could not run (unknown user, not root)."""


def files_named(prepared: Prepared, config_path: str) -> list[str]:
    """The config file and every file it names, including those a kubeconfig names."""
    hc = prepared.cfg.health_check
    kc = prepared.cfg.discovery.kubernetes
    named = [config_path, hc.ca_file, hc.client_cert_file, hc.client_key_file]
    if kc.enabled:
        named += [kc.kubeconfig, kc.ca_file, kc.token_file]
        if prepared.credentials is not None:
            named += prepared.credentials.files
    return list(dict.fromkeys(f for f in named if f))


def _setpriv(user: str) -> list[str]:
    """setpriv options for `user`, without any capability, as the shipped unit runs it."""
    if user == DYNAMIC:
        ids = [f"--reuid={DYNAMIC_UID}", f"--regid={DYNAMIC_UID}", "--clear-groups"]
    else:
        try:
            entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            raise CheckError(
                f"no such user {user!r} (use {DYNAMIC!r} for DynamicUser=yes)"
            ) from None
        ids = [f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups"]
    # CapabilityBoundingSet= is empty in the unit: even root reads only what its uid may.
    return ["setpriv", *ids, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"]


def unreadable(paths: Iterable[str], user: str) -> dict[str, str]:
    """The files `user` cannot read, with the reason; empty when it can read them all."""
    argv = [*_setpriv(user), sys.executable, "-I", "-c", _CHILD, json.dumps(list(paths))]
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
        )
    except OSError as exc:
        raise CheckError(f"cannot run setpriv (util-linux): {exc.strerror or exc}") from None
    if result.returncode != 0:
        detail = result.stderr.strip()[-300:]
        raise CheckError(f"the check as {user!r} failed (it needs root): {detail}")
    problems: dict[str, str] = json.loads(result.stdout)
    return problems
