"""Health: active checks (the checker, its TCP and HTTPS probes), stall-aware timeouts,
and passive signs from forwarded connections, all feeding the core's pool.

Imports ``kubeprism.config`` (the healthCheck section), ``kubeprism.core`` and
``kubeprism.base``; never forwarding (the probe's socket comes from ``base.sockets``,
as the dialer's does) and never its sibling ``kubeprism.discovery``.
"""
