"""Health: active checks (the checker, its TCP and HTTPS probes), stall-aware timeouts,
and passive signs from forwarded connections, all feeding the core's pool.

Imports ``kubeprism.config`` (the healthCheck section), ``kubeprism.core`` and
``kubeprism.base``; never its sibling ``kubeprism.discovery``.
"""
