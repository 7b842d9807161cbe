"""Which output of the libraries modeling_rag drives reaches the console.

modeling_rag shows its own progress bars for long work (chunking, encoding, tokenising passages)
and its own log lines. The bars of the libraries underneath (transformers' ``Loading weights`` and
``Writing model shards``, bm25s' ``Split strings``, the GGUF reader's) describe steps of ours that we
already report, so inside our calls they are off, and put back as they were afterwards:

- [`quiet_library_output`] is that scope (a context manager, also usable as a decorator);
- [`show_library_output`] turns the quieting off for the whole process (a script's ``--verbose``);
- [`configure_script_output`] is what a script calls once after parsing its arguments: quiet by
  default (transformers' and the Hub's bars off, transformers' notices below errors hidden), or
  everything with ``verbose=True``.

Warnings that say something is wrong (missing weights, a bad config) are not touched by
`quiet_library_output`: only progress bars are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator

# loggers of libraries underneath that log routine steps at INFO or DEBUG
NOISY_LOGGERS = ("bm25s", "faiss", "faiss.loader", "httpx", "urllib3")
# (category, message regex) of deprecation notices one library raises about another's call, not ours to
# act on; quiet scripts hide them. peft reads `is_gradient_checkpointing`, which transformers 5 renamed.
LIBRARY_DEPRECATIONS = ((FutureWarning, r"`is_gradient_checkpointing` is deprecated"),)


class _WarningsAndAbove(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


# on the NOISY_LOGGERS in quiet scripts: a logger's filter holds even when its library sets its level
# again on import (bm25s sets DEBUG)
QUIET_FILTER = _WarningsAndAbove()
_state = {"show": False}
_lock = threading.Lock()
_depth = {"n": 0, "previous": None}


def show_library_output(enabled: bool = True) -> None:
    """Lets the libraries' own progress bars through inside modeling_rag's calls (``False``: hide them again)."""
    _state["show"] = bool(enabled)


def library_output_shown() -> bool:
    """Whether the libraries' own progress bars are let through (see [`show_library_output`])."""
    return _state["show"]


def _quiet_tqdm(factory, args, kwargs):
    # transformers' tqdm hook: the same bar object, created disabled
    return factory(*args, **{**kwargs, "disable": True})


def _hide_transformers_bars():
    """Turns transformers' progress bars off; returns how to put them back."""
    from transformers.utils import logging as hf_logging

    if hasattr(hf_logging, "set_tqdm_hook"):
        # a hook changes only transformers' bars (disable_progress_bar() would switch the Hub's too)
        previous = hf_logging.set_tqdm_hook(_quiet_tqdm)
        return lambda: hf_logging.set_tqdm_hook(previous)
    if not hf_logging.is_progress_bar_enabled():  # pragma: no cover - transformers without set_tqdm_hook
        return lambda: None
    hf_logging.disable_progress_bar()  # pragma: no cover
    return hf_logging.enable_progress_bar  # pragma: no cover


@contextlib.contextmanager
def quiet_library_output() -> Iterator[None]:
    """Inside the block, transformers' progress bars are off (unless [`show_library_output`] is on).

    Nested and concurrent blocks are counted: the bars come back when the last one ends.
    """
    if _state["show"]:
        yield
        return
    with _lock:
        if _depth["n"] == 0:
            _depth["previous"] = _hide_transformers_bars()
        _depth["n"] += 1
    try:
        yield
    finally:
        with _lock:
            _depth["n"] -= 1
            if _depth["n"] == 0:
                restore, _depth["previous"] = _depth["previous"], None
                restore()


def configure_script_output(verbose: bool = False) -> None:
    """Sets up a script's console: our log lines and bars; the libraries' only with ``verbose``.

    Quiet (the default): modeling_rag logs at INFO, every other library at WARNING (also those that
    set their own logger lower, `NOISY_LOGGERS`); transformers logs errors only; transformers, the
    Hub and datasets show no progress bars, and `LIBRARY_DEPRECATIONS` are hidden. Verbose: INFO for every logger, and the libraries' bars,
    also inside modeling_rag's calls.
    """
    logging.basicConfig(
        format="%(levelname)s %(name)s: %(message)s", level=logging.INFO if verbose else logging.WARNING
    )
    logging.getLogger("modeling_rag").setLevel(logging.INFO)
    show_library_output(verbose)
    for chatty in NOISY_LOGGERS:
        if verbose:
            logging.getLogger(chatty).removeFilter(QUIET_FILTER)
        else:
            logging.getLogger(chatty).addFilter(QUIET_FILTER)  # adds it once
    if verbose:
        return
    for category, message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # read when these libraries are imported: set for those not imported yet
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()  # the Hub's bars too
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
