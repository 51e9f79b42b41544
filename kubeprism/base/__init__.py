"""Small shared helpers at the bottom of every import: addresses and the errno policy,
atomic files, logging, task supervision, systemd's sd_notify and sd_listen_fds, and the
upstream socket (options and opening) that both forwarding and the health checks use.

Imports nothing of kubeprism; anything may import it.
"""
