"""kubeprism: a node-local Kubernetes API-server load balancer."""

from __future__ import annotations

__version__ = "0.1.0"

from kubeprism.native import select as _select_engine

# "native" (the data path compiled by mypyc) or "python", and why; decided before any of
# the modules it covers is imported (kubeprism/native.py).
ENGINE, ENGINE_REASON = _select_engine()
