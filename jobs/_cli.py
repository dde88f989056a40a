"""What every command line shares: one logging set-up."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """INFO and above to stderr, in one format for every job."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
