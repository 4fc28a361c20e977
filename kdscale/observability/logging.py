"""Console logging for kdscale: one logger, plain readable lines, quiet third-party libraries."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def get_logger(name: str = "kdscale") -> logging.Logger:
    """The kdscale logger (INFO to stderr, 'HH:MM:SS message'); configured once per process."""
    global _CONFIGURED
    logger = logging.getLogger("kdscale")
    if not _CONFIGURED:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("KDSCALE_LOG_LEVEL", "INFO"))
        logger.propagate = False
        _CONFIGURED = True
    return logger if name == "kdscale" else logger.getChild(name.removeprefix("kdscale."))


def quiet_third_party() -> None:
    """Silence progress bars and info chatter of transformers / Ray / torch in worker processes."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # transformers not importable yet: the env vars above still apply
        pass
