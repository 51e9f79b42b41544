"""Operations: the Prometheus registry and its scrape-time collectors, the admin HTTP
server, and the `status` and `reload` commands that talk to it.

Above the wings: collectors read the pool, the proxy, the checks' cost and the discovery
state at scrape time. Nothing below imports this wing; only the composition root and the
CLI do.
"""
