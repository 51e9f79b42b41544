"""Command line: the only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import sys

import uvloop
import yaml

from kubeprism import __version__
from kubeprism.config import DEFAULT_CONFIG_PATH, ConfigError, config_to_dict, load_config
from kubeprism.daemon import Daemon, StartupError
from kubeprism.logs import LOG_FORMATS, LOG_LEVELS, setup_logging

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
    sub.add_parser("version", help="print the version")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until stopped."""
    cfg = load_config(args.config)

    async def main() -> None:
        daemon = Daemon(cfg)
        daemon.bind()
        await daemon.run()

    try:
        uvloop.run(main())
    except StartupError as exc:
        logger.error("%s", exc)
        return EXIT_STARTUP
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate and print the effective config."""
    cfg = load_config(args.config)
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kubeprism` command."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        if args.command == "version":
            print(f"kubeprism {__version__}")
            return EXIT_OK
        if args.command == "check-config":
            return cmd_check_config(args)
        return cmd_run(args)
    except ConfigError as exc:
        logger.error("invalid config %s: %s", args.config, exc)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
