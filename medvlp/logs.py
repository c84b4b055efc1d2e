"""Console logging of medvlp's own messages (the command line and the sweep)."""

from __future__ import annotations

import logging


def setup_logging(verbose: bool) -> None:
    """medvlp's own messages on stderr (Lightning configures its own loggers)."""
    logger = logging.getLogger("medvlp")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
