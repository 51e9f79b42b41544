"""kubeprism: a node-local Kubernetes API-server load balancer."""

from __future__ import annotations

import sys as _sys

from kubeprism.native import EngineError as _EngineError
from kubeprism.native import select as _select_engine

__version__ = "0.1.0"

# "native" (the data path compiled by mypyc) or "python", and why; decided before any of
# the modules it covers is imported (kubeprism/native.py).
try:
    ENGINE, ENGINE_REASON = _select_engine()
except _EngineError as _exc:
    # Like a bad config key: one line naming the variable, exit 2 (not a traceback).
    print(f"kubeprism: {_exc}", file=_sys.stderr)
    raise SystemExit(2) from None
