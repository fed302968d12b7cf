"""Logging set-up (rich handler) and progress bars shared by every stage."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def setup_logging(level: str | int = "INFO", quiet_libraries: bool = True) -> None:
    """Configure the root logger once, with rich formatting; ``quiet_libraries``: keep third-party progress
    bars, chatter and warnings off the console (:func:`quiet_third_party`)."""
    root = logging.getLogger()
    if any(isinstance(h, RichHandler) for h in root.handlers):
        root.setLevel(level)
    else:
        logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                            handlers=[RichHandler(rich_tracebacks=False, show_path=False)])
    if quiet_libraries:
        quiet_third_party(verbose=root.getEffectiveLevel() <= logging.DEBUG)


#: Third-party loggers and the level below which their records are dropped (``verbose``: one level lower).
#: The Hugging Face libraries log routine loading details at WARNING ("Some weights ...", "Already found a
#: peft_config ..."), so only their errors reach the console.
THIRD_PARTY_LOGGERS: dict[str, int] = {
    **dict.fromkeys(("transformers", "huggingface_hub", "accelerate", "peft", "datasets", "safetensors"),
                    logging.ERROR),
    **dict.fromkeys(("urllib3", "PIL", "matplotlib", "numexpr", "filelock", "fsspec", "h5py", "asyncio",
                     "httpx", "httpcore", "numba", "tifffile"), logging.WARNING),
}
#: Set before the libraries are imported (they read them once, at import): no tqdm bars (Hugging Face's
#: "Loading weights", "Loading checkpoint shards", GGUF conversion, peft), transformers' own stderr handler
#: at error level. A value the user set wins.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
_OWN_PACKAGE = __name__.split(".")[0]  # "oncofm"
_original_showwarning = warnings.showwarning


def _warning_issuer() -> str:
    """Module name of the code that called ``warnings.warn`` (not where ``stacklevel`` points: a library's
    deprecation warning is attributed to its caller, which may be OncoFM's code)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in ("warnings", __name__):
        frame = frame.f_back
    return str(frame.f_globals.get("__name__", "")) if frame is not None else ""


def _is_own(module: str) -> bool:
    return module == _OWN_PACKAGE or module.startswith(_OWN_PACKAGE + ".") or module == "__main__"


def _showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: object = None, line: str | None = None) -> None:
    """``warnings.showwarning`` routed through logging: OncoFM's own warnings as WARNING records of the
    issuing module's logger (on the console as before); third-party ones at DEBUG (shown with ``-v``)."""
    if file is not None:  # an explicit target (warnings.showwarning(..., file=f)): leave it alone
        _original_showwarning(message, category, filename, lineno, file, line)
        return
    issuer = _warning_issuer()
    text = str(message) if category is UserWarning else f"{category.__name__}: {message}"
    if _is_own(issuer):
        logging.getLogger(issuer if issuer != "__main__" else _OWN_PACKAGE).warning("%s", text)
    else:
        logging.getLogger("py.warnings").debug("%s (%s:%d, from %s)", text, filename, lineno, issuer or "?")


def quiet_third_party(verbose: bool = False) -> None:
    """Keep third-party output off the console, OncoFM's own log lines, warnings and progress untouched.

    - progress bars of tqdm and the Hugging Face libraries off, transformers' logging at error level
      (environment variables of :data:`QUIET_ENV`, set unless already set; libraries already imported are
      told directly);
    - third-party loggers (:data:`THIRD_PARTY_LOGGERS`) raised to ERROR / WARNING (``verbose``: WARNING / INFO);
    - Python warnings go through logging: those issued by OncoFM's code stay on the console as warnings,
      third-party ones (Deprecation/Future/User warnings of torch, transformers, pandas ...) become DEBUG
      records, visible with ``oncofm -v``.
    Idempotent.
    """
    users_verbosity = os.environ.get("TRANSFORMERS_VERBOSITY") not in (None, "error", "warning")
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, "warning" if verbose and key == "TRANSFORMERS_VERBOSITY" else value)
    for name, level in THIRD_PARTY_LOGGERS.items():
        if not (name == "transformers" and users_verbosity):
            logging.getLogger(name).setLevel(level - 10 if verbose else level)
    if "transformers" in sys.modules and not users_verbosity:  # imported already: it read its settings
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(THIRD_PARTY_LOGGERS["transformers"] - (10 if verbose else 0))
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    warnings.showwarning = _showwarning


class _Progress(Progress):
    """A rich Progress that leaves nothing behind when none of its tasks was visible (``visible=False``
    tasks otherwise leave an empty line per bar on a console that is not a terminal, e.g. ``make demo | tee``)."""

    def stop(self) -> None:
        if self.disable or any(task.visible for task in self.tasks):
            super().stop()
            return
        self.live.transient = True  # nothing was shown: print neither the (empty) last frame nor a newline
        self.live.stop()


def make_progress() -> Progress:
    """A rich progress bar with count, elapsed and remaining time (quiet when not a terminal)."""
    return _Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                     TimeElapsedColumn(), TimeRemainingColumn(), transient=False)


def track(items: Iterable[T], description: str, total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` with a progress bar."""
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
