"""A real systemd 252 as PID 1 of a `systemd-nspawn` container, for tests of the shipped units.

PID 1 of the test machines is not systemd, so the units in deploy/systemd are exercised here:
a Debian 12 rootfs (built once per machine with debootstrap from the mirror apt already uses,
cached under CACHE_DIR), booted with `--volatile=overlay` so every container starts from the
same pristine tree, driven with `nsenter -t <PID 1> -a`, powered off with SIGRTMIN+4::

    wheels = build_wheelhouse(tmp_path / "wheels", wheel)   # project wheel + dependencies
    with SystemdContainer(binds={wheels: "/srv/wheels"}) as box:
        box.install_kubeprism("/srv/wheels")                 # /opt/kubeprism, /usr/local/bin
        box.run("systemctl", "start", "kubeprism.service")
        print(box.run("systemctl", "is-active", "kubeprism").stdout)

The container has a private network (only its own loopback): servers a test needs (the TLS
stand-in, say) run inside it too, from files bound in with `binds`. A bound directory must be
traversable by the service's (dynamic) user: SystemdContainer makes each one 0755.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

from util import wait_for

REPO = Path(__file__).resolve().parent.parent
# One rootfs and one dependency wheelhouse per machine, shared by every worktree and test run.
CACHE_DIR = Path(os.environ.get("KUBEPRISM_TEST_CACHE", "/var/cache/kubeprism-tests"))
SUITE = "bookworm"
# procps for /bin/kill (ExecReload), libnss-systemd so a DynamicUser has a name, python3-venv
# for the documented install, iproute2 and curl for checks from inside.
ROOTFS_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libnss-systemd",
    "procps",
    "python3",
    "python3-venv",
    "iproute2",
    "curl",
)
# debootstrap of the minbase variant takes ~65 s on these machines; a slow mirror can triple it.
ROOTFS_BUILD_TIMEOUT = 900.0
# A booted container reaches multi-user.target in < 1 s here; leave room for a loaded machine.
BOOT_TIMEOUT = 60.0
POWEROFF_TIMEOUT = 30.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Where kubeprism_container() puts things inside: the documented venv, the repository (read-only).
VENV = "/opt/kubeprism"
REPO_INSIDE = "/srv/kubeprism"
# Environment for commands run inside: none of the host's (pyenv shims, pip config) leaks in.
CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


def missing_tools() -> list[str]:
    """Host commands the containers need that are not installed (empty when all are)."""
    return [t for t in ("systemd-nspawn", "debootstrap", "nsenter") if shutil.which(t) is None]


# ---------------------------------------------------------------------------------------------
# The rootfs


def debian_mirror() -> str:
    """The Debian archive URI the host's apt uses for the main suite (deb822 or one-line form).

    Read at run time on purpose: no mirror name is written into the repository.
    """
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = _deb822_fields(stanza)
            suites = fields.get("suites", "").split()
            if "deb" in fields.get("types", "").split() and SUITE in suites:
                return fields["uris"].split()[0]
    one_line = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            # deb [options] URI SUITE COMPONENTS...
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    raise RuntimeError(f"no 'deb' source for {SUITE} in apt's configuration (/etc/apt)")


def _deb822_fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in stanza.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0].isspace() and key:
            fields[key] += " " + line.strip()
            continue
        key, _, value = line.partition(":")
        key = key.strip().lower()
        fields[key] = value.strip()
    return fields


def rootfs() -> Path:
    """The cached Debian 12 rootfs, built on first use (atomically, one builder at a time)."""
    key = hashlib.sha256(" ".join((SUITE, *ROOTFS_PACKAGES)).encode()).hexdigest()[:12]
    target = CACHE_DIR / f"rootfs-{SUITE}-{key}"
    if (target / "usr/lib/systemd/systemd").exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE_DIR / f"rootfs-{key}.lock"):
        if (target / "usr/lib/systemd/systemd").exists():
            return target  # another test run built it while we waited for the lock
        building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=CACHE_DIR))
        try:
            _debootstrap(building)
            building.chmod(0o755)  # mkdtemp's 0700 would become the container's / mode
            building.rename(target)
        finally:
            if building.exists():
                _unmount_below(building)  # a failed debootstrap leaves /proc etc. mounted
                shutil.rmtree(building, ignore_errors=True)
    return target


def _debootstrap(directory: Path) -> None:
    argv = [
        "debootstrap",
        "--variant=minbase",
        "--include=" + ",".join(ROOTFS_PACKAGES),
        SUITE,
        str(directory),
        debian_mirror(),
    ]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=ROOTFS_BUILD_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
        raise RuntimeError(f"debootstrap failed ({result.returncode}):\n{tail}")


def _unmount_below(directory: Path) -> None:
    prefix = str(directory.resolve()) + "/"
    for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
        mount_point = line.split()[1]
        if mount_point.startswith(prefix):
            subprocess.run(["umount", "--lazy", mount_point], check=False)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Wheels: the project's, built fresh, and its dependencies, cached (the container has no network)


def build_wheelhouse(directory: Path, project_wheel: Path) -> Path:
    """`directory` filled with ``project_wheel`` (image.py builds it) and every dependency
    wheel; returns it.

    Dependencies come from a per-machine cache keyed by the dependency list and Python
    version.
    """
    directory.mkdir(parents=True, exist_ok=True)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    key = hashlib.sha256(" ".join([tag, *sorted(deps)]).encode()).hexdigest()[:12]
    cached = CACHE_DIR / f"wheels-{tag}-{key}"
    if not cached.is_dir():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        with _locked(CACHE_DIR / f"wheels-{key}.lock"):
            if not cached.is_dir():
                building = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=CACHE_DIR))
                try:
                    _pip("wheel", "--wheel-dir", str(building), *deps)
                    building.chmod(0o755)
                    building.rename(cached)
                finally:
                    shutil.rmtree(building, ignore_errors=True)
    for wheel in cached.glob("*.whl"):
        shutil.copy2(wheel, directory)
    shutil.copy2(project_wheel, directory)
    return directory


def _pip(*args: str) -> None:
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pip {args[0]} failed:\n{result.stdout}{result.stderr}")


# ---------------------------------------------------------------------------------------------
# The container


class SystemdContainer:
    """One booted container with systemd as PID 1; a context manager that powers it off.

    `binds` maps host directories to paths inside (read-write; each is made 0755 so a
    dynamic user can traverse it). Each container gets cgroups of its own, so several can
    run at once (there is no host systemd to hand out scopes).
    """

    _count = 0

    def __init__(
        self,
        binds: Mapping[Path, str] | None = None,
        read_only_binds: Mapping[Path, str] | None = None,
    ) -> None:
        SystemdContainer._count += 1
        self.name = f"kp{os.getpid()}-{SystemdContainer._count}"
        self.binds = dict(binds or {})
        self.read_only_binds = dict(read_only_binds or {})
        self.pid = 0  # the container's PID 1, as seen from the host
        self.proc: subprocess.Popen[bytes] | None = None
        self.console = Path(tempfile.mkstemp(prefix=f"{self.name}-", suffix=".console")[1])
        self._cgroups: list[Path] = []

    def __enter__(self) -> SystemdContainer:
        try:
            self.boot()
        except BaseException:
            self.poweroff()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.poweroff()
        if exc_type is None:  # kept after a failure: boot errors name it
            self.console.unlink(missing_ok=True)

    def boot(self) -> None:
        """Start systemd-nspawn and wait until the container's boot has finished."""
        root = rootfs()
        argv = [
            "systemd-nspawn",
            f"--directory={root}",
            f"--machine={self.name}",
            "--register=no",  # no host systemd (machined) to register with
            "--keep-unit",  # ... nor one to create a scope unit
            "--private-network",
            "--volatile=overlay",  # changes go to a tmpfs: the cached rootfs stays pristine
            "--console=read-only",
        ]
        init = self._init_command()  # may add binds
        for host, inside in self.binds.items():
            host.chmod(0o755)
            argv.append(f"--bind={host}:{inside}")
        argv += [f"--bind-ro={host}:{inside}" for host, inside in self.read_only_binds.items()]
        argv += init
        self._cgroups = [*_make_cgroups(self.name), *self._extra_cgroups()]
        # Enter our own cgroups first, then exec: nspawn sets the container up inside them.
        enter = " ".join(f"echo $$ > {cg / 'cgroup.procs'};" for cg in self._cgroups)
        with self.console.open("wb") as log:
            self.proc = subprocess.Popen(
                ["sh", "-c", f'{enter} exec "$@"', "sh", *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.pid = wait_for(self._find_pid1, BOOT_TIMEOUT, message="container PID 1")
        wait_for(self._booted, BOOT_TIMEOUT, 0.1, f"boot of {self.name} ({self.console})")

    def _init_command(self) -> list[str]:
        """What nspawn runs as PID 1 (after its options): systemd, booted the usual way."""
        return ["--boot"]

    def _extra_cgroups(self) -> list[Path]:
        """Host cgroups to enter besides the container's own (a subclass's hook)."""
        return []

    def _find_pid1(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited: {self.console_text()[-2000:]}")
        for child in _children(self.proc.pid):
            if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                return child
        return 0

    def _booted(self) -> bool:
        state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
        if state in ("running", "degraded"):
            return True
        if state in ("stopping", "offline") or (self.proc and self.proc.poll() is not None):
            raise RuntimeError(f"container {self.name} did not boot: {state}")
        return False

    def console_text(self) -> str:
        """What the container wrote to its console (systemd's boot messages)."""
        return self.console.read_text(errors="replace")

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container; raise (with its output) if `check` and rc != 0."""
        result = subprocess.run(
            self.nsenter_argv(*argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env={**CONTAINER_ENV, **(env or {})},
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode} in {self.name}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def sh(self, script: str, check: bool = True, timeout: float = 60.0) -> str:
        """Run a shell script inside the container; return its stdout."""
        return self.run("sh", "-euc", script, check=check, timeout=timeout).stdout

    def nsenter_argv(self, *argv: str) -> list[str]:
        """Host command line that runs `argv` inside the container (for Popen)."""
        return ["nsenter", "-t", str(self.pid), "-a", *argv]

    def popen(self, *argv: str, stdout: int | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running command inside the container (a test server, a load loop)."""
        return subprocess.Popen(
            self.nsenter_argv(*argv), stdin=subprocess.DEVNULL, stdout=stdout, env=CONTAINER_ENV
        )

    def journal(self, unit: str = "kubeprism.service") -> str:
        """The unit's journal since boot (for assertion messages and log checks)."""
        return self.run("journalctl", "-u", unit, "-o", "cat", "--no-pager", check=False).stdout

    def install_units(self) -> None:
        """The shipped units into /etc/systemd/system (from the repository bound at REPO_INSIDE)."""
        self.sh(
            f"install -m 0644 {REPO_INSIDE}/deploy/systemd/kubeprism.service "
            f"{REPO_INSIDE}/deploy/systemd/kubeprism.socket /etc/systemd/system/\n"
            "systemctl daemon-reload"
        )

    def install_kubeprism(self, wheels: str, venv: str = VENV) -> None:
        """The documented install, offline: venv, pip --no-index --find-links, PATH link."""
        self.sh(
            f"python3 -m venv {venv}\n"
            f"{venv}/bin/pip install -q --disable-pip-version-check --no-index "
            f"--find-links {wheels} kubeprism\n"
            f"ln -sf {venv}/bin/kubeprism /usr/local/bin/kubeprism",
            timeout=300,
        )

    def setup_kubeprism(self) -> None:
        """For a kubeprism_container(): the command on PATH and the shipped units installed."""
        self.run("ln", "-sf", f"{VENV}/bin/kubeprism", "/usr/local/bin/kubeprism")
        self.install_units()

    def poweroff(self) -> None:
        """SIGRTMIN+4 to PID 1 (clean poweroff); SIGKILL if it does not end in time."""
        if self.proc is not None and self.proc.poll() is None:
            if self.pid:
                os.kill(self.pid, signal.SIGRTMIN + 4)
            try:
                self.proc.wait(POWEROFF_TIMEOUT)
            except subprocess.TimeoutExpired:
                if self.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)  # ends the whole PID namespace
                self.proc.kill()
                self.proc.wait()
        for cgroup in reversed(self._cgroups):
            _remove_cgroup(cgroup)
        self._cgroups = []


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _make_cgroups(name: str) -> list[Path]:
    """A fresh cgroup in the systemd and unified hierarchies (those nspawn manages)."""
    made = []
    for hierarchy in ("unified", "systemd"):
        base = CGROUP_ROOT / hierarchy
        if not (base / "cgroup.procs").exists():
            continue
        own = Path(base, *_current_cgroup(hierarchy).parts[1:], f"kubeprism-test-{name}")
        own.mkdir(exist_ok=True)
        made.append(own)
    if not made and (CGROUP_ROOT / "cgroup.procs").exists():  # a pure cgroup v2 host
        own = Path(CGROUP_ROOT, *_current_cgroup("").parts[1:], f"kubeprism-test-{name}")
        own.mkdir(exist_ok=True)
        made.append(own)
    return made


def _current_cgroup(hierarchy: str) -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (hierarchy == "systemd" and controllers == "name=systemd") or (
            hierarchy in ("unified", "") and controllers == ""
        ):
            return Path(path)
    return Path("/")


def _remove_cgroup(cgroup: Path) -> None:
    """Remove a cgroup tree bottom-up (nspawn leaves the container's sub-cgroups behind)."""
    if not cgroup.exists():
        return
    for sub in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        cgroup.rmdir()


# ---------------------------------------------------------------------------------------------
# kubeprism installed: what most tests start from


def install_venv(venv_dir: Path, wheels: Path) -> Path:
    """Install kubeprism offline into host directory `venv_dir`, as it is seen at VENV inside.

    Containers from kubeprism_container() bind it at VENV, so the ~13 s install happens
    once per session instead of once per container.
    """
    with SystemdContainer(binds={wheels: "/srv/wheels", venv_dir: VENV}) as box:
        box.install_kubeprism("/srv/wheels")
    return venv_dir


def kubeprism_container(
    venv_dir: Path, binds: Mapping[Path, str] | None = None
) -> SystemdContainer:
    """A container (not booted yet: use `with`) with the venv at VENV and the repo at REPO_INSIDE.

    After boot, call `box.setup_kubeprism()`: PATH link and the shipped units installed.
    """
    return SystemdContainer(
        binds={venv_dir: VENV, **(binds or {})}, read_only_binds={REPO: REPO_INSIDE}
    )
