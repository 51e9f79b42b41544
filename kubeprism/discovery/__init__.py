"""Discovery: which endpoints exist. Static upstreams and DNS names, the EndpointSlice
watch and its credentials, the on-disk cache, and the membership that merges them into
the core's pool and retires what leaves.

Imports ``kubeprism.config``, ``kubeprism.core`` and ``kubeprism.base``; never
forwarding, and never its sibling ``kubeprism.health`` (membership tells the checker
about a changed set through a callback the composition root passes in).
"""
