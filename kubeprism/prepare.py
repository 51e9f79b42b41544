"""Everything a config needs that can fail, built before any running state is touched.

`kubeprism run`, `kubeprism check-config` and a reload all go through
:func:`load`, so check-config and run agree on every file the config names,
and a reload that cannot be built leaves the running daemon as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kubeprism.config import Config, load_config
from kubeprism.discovery.credentials import Credentials, load_credentials
from kubeprism.health.checker import TcpProbe
from kubeprism.health.https import HttpsProbe, make_probe


@dataclass(frozen=True)
class Prepared:
    """A validated config with its TLS contexts and credentials already loaded."""

    cfg: Config
    credentials: Credentials | None
    # Holds only an SSL context until its first probe: nothing to close if unused.
    probe: HttpsProbe | TcpProbe


def prepare(cfg: Config) -> Prepared:
    """Load every file the config names; ConfigError (naming key and file) if one is bad."""
    kc = cfg.discovery.kubernetes
    credentials = load_credentials(kc) if kc.enabled else None
    return Prepared(cfg, credentials, make_probe(cfg.health_check))


def load(path: str | Path) -> Prepared:
    """Read, validate and prepare a config file."""
    return prepare(load_config(path))
