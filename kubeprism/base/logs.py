"""Logging setup: text for people and journald, JSON with stable field names for machines."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
# journald reads a "<N>" prefix on stream lines as the syslog priority (SyslogLevelPrefix=),
# so `journalctl -p warning` filters kubeprism's lines like any native service's.
SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg (+ error)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """Text without a timestamp (journald adds its own), with a syslog priority prefix."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def stderr_is_journal() -> bool:
    """True when stderr is the journald stream systemd connected (systemd.exec(5)).

    JOURNAL_STREAM is inherited by children whose stderr may point elsewhere (a file, a
    pipe), so it counts only when it names the device and inode of our own stderr.
    """
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def set_level(level: str | None) -> None:
    """Set the root log level (the command line's, then the config's); None keeps it."""
    if level:
        logging.getLogger().setLevel(level.upper())


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once, on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif stderr_is_journal():
        # journald stamps every line itself; a second timestamp is noise.
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # aiohttp logs each admin request at INFO; scrapes every few seconds would drown the log.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
