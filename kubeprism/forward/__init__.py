"""Forwarding, the only fd-level wing: its own epoll reactor, listeners, dial, the pumps
(splice or copy), connection lifecycle and drain, and handing connections to the next
process.

Imports ``kubeprism.core`` (the pool it asks for an endpoint and reports to) and
``kubeprism.base``; never configuration, health, discovery or operations. The composition
root translates the config into ``ProxySettings`` and passes callbacks in.
"""
