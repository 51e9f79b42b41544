"""kubeprism: a node-local Kubernetes API-server load balancer."""

from __future__ import annotations

__version__ = "0.1.0"
