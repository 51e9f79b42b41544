"""The pure core: endpoint state, evidence, hysteresis, choice and check cadence.

No sockets, no clock, no event loop (h11's rule): callers pass ``now`` and report what
happened; everything here is a state change on plain data. Imports only ``kubeprism.base``
(addresses); every other wing imports this one, never the other way round.
"""
