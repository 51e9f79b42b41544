"""Run kubeprism in front of two local stand-in API servers (see scripts/demo)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from certs import write_pki  # noqa: E402
from standin import StandinProcess, standin_argv  # noqa: E402

CONFIG = """\
# Written by scripts/demo: two stand-in API servers on loopback.
listen: ["127.0.0.1:{port}"]
upstreams: ["127.0.0.1:{a}", "127.0.0.1:{b}"]
healthCheck:
  caFile: {ca}
  serverName: kubernetes
admin:
  listen: "127.0.0.1:{admin}"
"""

TRY = """
kubeprism is running on 127.0.0.1:{port} in front of stand-ins A (:{a}) and B (:{b}).
Try, in another terminal:
  curl --cacert {ca} --connect-to kubernetes:{port}:127.0.0.1:{port} https://kubernetes:{port}/version
  curl -s http://127.0.0.1:{admin}/upstreams
  curl -s http://127.0.0.1:{admin}/metrics | grep ^kubeprism_upstream_up
  kill -USR1 {pid_a}    # flip stand-in A's /readyz to 500 and watch kubeprism take it out
Config: {config}    Stop with Ctrl-C.
"""


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # `kill` (SIGTERM) stops the demo like Ctrl-C does: the daemon drains, the stand-ins
    # stop, nothing is left running.
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=7445)
    parser.add_argument("--admin-port", type=int, default=7446)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubeprism-demo-"))
    pki = write_pki(work)
    with (
        StandinProcess(standin_argv("A", pki.server_cert, pki.server_key)) as a,
        StandinProcess(standin_argv("B", pki.server_cert, pki.server_key)) as b,
    ):
        config = work / "kubeprism.yaml"
        values = {
            "port": args.port,
            "admin": args.admin_port,
            "a": a.port,
            "b": b.port,
            "ca": pki.ca,
            "pid_a": a.pid,
            "config": config,
        }
        config.write_text(CONFIG.format(**values))
        print(TRY.format(**values), flush=True)
        cmd = [sys.executable, "-m", "kubeprism", "run", "--config", str(config)]
        daemon = subprocess.Popen(cmd, cwd=REPO)
        try:
            return daemon.wait()
        except KeyboardInterrupt:
            # Ctrl-C reaches the daemon too (same process group), SIGTERM only this
            # process: either way the daemon is told once more and drains.
            daemon.terminate()
            return daemon.wait()


if __name__ == "__main__":
    sys.exit(main())
