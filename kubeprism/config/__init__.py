"""Configuration: the frozen, typed config (``model``), the field table that reads and
renders every key (``fields``), each kind of value (``values``) and safe YAML reading
(``safeyaml``).

Imports only ``kubeprism.base``; every wing that needs settings imports this one, except
forwarding and the core, which are handed plain values. The names below are the public
ones: ``from kubeprism.config import Config, ConfigError``.
"""

from __future__ import annotations

# model.__all__ is the one list of public names; the package re-exports exactly it.
from kubeprism.config.model import *  # noqa: F403
from kubeprism.config.model import __all__ as __all__
