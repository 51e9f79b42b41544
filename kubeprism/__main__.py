"""Command line: the only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvloop
import yaml

from kubeprism import ENGINE, ENGINE_REASON, __version__, prepare, readable
from kubeprism.base.logs import LOG_FORMATS, LOG_LEVELS, setup_logging
from kubeprism.config import DEFAULT_CONFIG_PATH, ConfigError, config_to_dict
from kubeprism.daemon import Daemon
from kubeprism.discovery import kubeconfig as kc
from kubeprism.forward import succession
from kubeprism.forward.listeners import StartupError
from kubeprism.ops import reloadcmd
from kubeprism.ops import status as st

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 3

logger = logging.getLogger("kubeprism")

DESCRIPTION = """\
kubeprism is a node-local load balancer for the Kubernetes API server. Point
kubelet, kube-proxy and CNI plugins at https://127.0.0.1:7445 (keeping TLS valid
with tls-server-name: kubernetes); kubeprism health-checks every API server and
hands each TCP connection, TLS untouched, to the healthiest, nearest one.

exit codes: 0 clean stop, 1 failure, 2 bad config, 3 start-up failure (port in use, ...)
"""


def _add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG_PATH,
        metavar="PATH",
        help=f"YAML config file (default: {DEFAULT_CONFIG_PATH})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="kubeprism",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default: info")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text (journald-friendly) or json (one object per line); default: text",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run",
        help="run the load balancer",
        description="Validate the config, bind every socket, then serve until SIGTERM/SIGINT. "
        "The first signal drains connections (up to drainTimeout); a second closes them at once.",
    )
    _add_config_arg(run)
    check = sub.add_parser(
        "check-config",
        help="validate a config file and print the effective config",
        description="Exit 0 and print the effective config (defaults filled in) if the file "
        "is valid; exit 2 with a message naming the bad key otherwise.",
    )
    _add_config_arg(check)
    check.add_argument(
        "--as-user",
        metavar="USER",
        help="also check that USER can read every file the config names, as the service "
        "will run: 'dynamic' for the shipped unit (DynamicUser=yes), 'root' with the "
        "kubelet-credentials drop-in (needs root)",
    )
    _add_reload_parser(sub)
    sub.add_parser("version", help="print the version")
    _add_status_parser(sub)
    _add_kubeconfig_parser(sub)
    return parser


STATUS_DESCRIPTION = """\
Show what a running kubeprism is doing: one line per API-server endpoint with its
state (healthy, unhealthy, unknown), the reason for it, the smoothed health-check
latency and latency class, priority, open and total connections, dial failures and the
sources that named it. Reads GET /upstreams from the admin endpoint (admin.listen).

exit status:
  0  at least one endpoint is healthy
  1  no endpoint is healthy (kubeprism is in panic mode, trying every endpoint)
  3  the admin endpoint cannot be reached or does not answer like kubeprism

examples:
  kubeprism status
  kubeprism status -o json | jq '.endpoints[] | select(.state != "healthy")'
  kubeprism status --admin 127.0.0.1:9446 || echo "no healthy API server"
"""

KUBECONFIG_DESCRIPTION = """\
Point a kubeconfig (kubelet's /etc/kubernetes/kubelet.conf, kube-proxy's, ...) at
kubeprism: set the cluster's server to https://127.0.0.1:7445 and tls-server-name to
"kubernetes", so clients keep verifying the API servers' own, unchanged certificates
(every kube-apiserver certificate carries that name) while they dial the loopback
address. Nothing else changes: users, contexts, certificate-authority-data,
extensions and unknown keys stay as they are.

The cluster rewritten is the one named by --cluster (repeatable), else the one of the
current context (of the only context if current-context is unset), as discovery reads
it. The file is replaced atomically
(temporary file in the same directory, fsync, rename) and keeps its mode and owner; a
symlink is followed. Comments are not kept. Restart the client (systemctl restart
kubelet) afterwards. With --diff nothing is written: a unified diff is printed, with
tokens, passwords and client keys redacted.

exit status:
  0  rewritten (or already pointing at kubeprism), or the diff was printed
  1  the file could not be written
  2  missing file, not a kubeconfig, cluster not found, bad --server

examples:
  kubeprism kubeconfig --diff
  kubeprism kubeconfig --kubeconfig /etc/kubernetes/kubelet.conf
  kubeprism kubeconfig --kubeconfig /var/lib/kube-proxy/kubeconfig.conf --cluster default
"""


def _add_status_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "status",
        help="show the endpoints of a running kubeprism (exit 1 if none is healthy)",
        description=STATUS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--admin",
        default=st.DEFAULT_ADMIN,
        metavar="URL|HOST:PORT",
        help=f"admin endpoint of the daemon (default: {st.DEFAULT_ADMIN})",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table for people (default), json (the /upstreams document) for scripts",
    )


def _add_reload_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "reload",
        help="reload a running kubeprism's config and report the outcome (for ExecReload=)",
        description="Send SIGHUP to --pid and wait until the reload counters on the admin "
        "endpoint move. Exit 0: the new config is in use; 1: it was rejected (the running "
        "config stays; the log names the bad key); 3: the outcome is unknown.",
    )
    parser.add_argument("--pid", type=int, required=True, help="kubeprism's PID ($MAINPID)")
    parser.add_argument(
        "--admin",
        default=st.DEFAULT_ADMIN,
        metavar="URL|HOST:PORT",
        help=f"admin endpoint of the daemon (default: {st.DEFAULT_ADMIN})",
    )


def _add_kubeconfig_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "kubeconfig",
        help="point a kubeconfig (kubelet, kube-proxy) at kubeprism",
        description=KUBECONFIG_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--kubeconfig",
        default=kc.DEFAULT_KUBECONFIG,
        metavar="PATH",
        help=f"file to rewrite (default: {kc.DEFAULT_KUBECONFIG})",
    )
    parser.add_argument(
        "--server",
        default=kc.DEFAULT_SERVER,
        metavar="URL",
        help=f"kubeprism's address as clients reach it (default: {kc.DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--tls-server-name",
        default=kc.DEFAULT_TLS_SERVER_NAME,
        metavar="NAME",
        help="name to verify the API server certificate against "
        f'(default: {kc.DEFAULT_TLS_SERVER_NAME}; "" removes the setting)',
    )
    parser.add_argument(
        "--cluster",
        action="append",
        default=[],
        metavar="NAME",
        help="cluster entry to rewrite; repeat for several (default: the current context's)",
    )
    parser.add_argument(
        "--diff", action="store_true", help="print a unified diff and change nothing"
    )
    parser.add_argument(
        "--output",
        metavar="PATH",
        help="write the result here instead of replacing the input file",
    )


def _prepared(path: str) -> prepare.Prepared | None:
    """The config file prepared as `run` needs it, or None once the reason is logged."""
    try:
        return prepare.load(path)
    except ConfigError as exc:
        logger.error("invalid config %s: %s", path, exc)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until stopped."""
    prepared = _prepared(args.config)
    if prepared is None:
        return EXIT_CONFIG

    daemon = Daemon(prepared, args.config)

    async def main() -> None:
        daemon.bind()
        await daemon.run()

    try:
        uvloop.run(main())
    except StartupError as exc:
        logger.error("%s", exc)
        return EXIT_STARTUP
    if daemon.successor is not None:  # SIGUSR2: the loop is gone, the connections are not
        succession.exec_in_place(*daemon.successor)
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate and print the effective config (the same preparation as `run`)."""
    prepared = _prepared(args.config)
    if prepared is None:
        return EXIT_CONFIG
    if args.as_user:
        try:
            files = readable.files_named(prepared, args.config)
            problems = readable.unreadable(files, args.as_user)
        except readable.CheckError as exc:
            logger.error("%s", exc)
            return EXIT_FAILURE
        for path, why in problems.items():
            logger.error("%s is not readable by user %s: %s", path, args.as_user, why)
        if problems:
            return EXIT_CONFIG
    sys.stdout.write(yaml.safe_dump(config_to_dict(prepared.cfg), sort_keys=False))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGHUP the daemon and wait for the outcome: 0 applied, 1 rejected, 3 unknown."""
    try:
        applied = reloadcmd.reload(args.pid, args.admin)
    except reloadcmd.ReloadUnknown as exc:
        logger.error("%s", exc)
        return EXIT_STARTUP
    if not applied:
        logger.error("the new config was rejected; the running config stays (see its log)")
        return EXIT_FAILURE
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Print the endpoint table (or JSON); 1 when none is healthy."""
    try:
        data = st.fetch(st.upstreams_url(args.admin))
    except st.AdminUnreachable as exc:
        logger.error("%s (is kubeprism running, and is --admin its admin.listen?)", exc)
        return EXIT_STARTUP
    sys.stdout.write(st.format_json(data) if args.output == "json" else st.format_table(data))
    return EXIT_OK if st.healthy_count(data) else EXIT_FAILURE


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    """Rewrite (or diff) a kubeconfig; 2 for any problem with the input."""
    source = Path(args.kubeconfig)
    try:
        result = kc.rewrite(source, args.server, args.tls_server_name, args.cluster)
    except kc.KubeconfigError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    if args.diff:
        if not kc.layout_preserved(result):
            logger.warning(
                "%s is not in PyYAML's layout: writing it would also reformat it and drop "
                "comments; the diff compares the parsed content",
                source,
            )
        sys.stdout.write(kc.diff(result, str(source)))
        return EXIT_OK
    target = Path(args.output) if args.output else source
    if not result.changed and target == source:
        logger.info("%s already points at %s; not rewritten", source, args.server)
        return EXIT_OK
    try:
        kc.write_atomically(target, result.new_text, mode_from=source)
    except OSError as exc:
        logger.error("cannot write %s: %s", target, exc.strerror or exc)
        return EXIT_FAILURE
    for change in result.changes:
        logger.info(
            "%s: cluster %r: server %s -> %s, tls-server-name %s -> %s",
            target,
            change.cluster,
            change.old_server,
            args.server,
            change.old_tls_server_name or "(unset)",
            args.tls_server_name or "(unset)",
        )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kubeprism` command."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        if args.command == "version":
            print(f"kubeprism {__version__}, forwarding engine: {ENGINE} ({ENGINE_REASON})")
            return EXIT_OK
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "reload":
            return cmd_reload(args)
        if args.command == "kubeconfig":
            return cmd_kubeconfig(args)
        return cmd_run(args)
    except ConfigError as exc:  # not every command has a --config to name
        logger.error("invalid config: %s", exc)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
