"""Progress bars that suit where they are written.

On a terminal, a tqdm bar redrawn in place. Anywhere else (a log file, a pipe, a notebook's
captured stderr), one plain line per ``log_seconds`` (30 s), and one at the end, instead of a
carriage-return redraw ten times a second: a day-long run leaves a readable log.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm

LOG_SECONDS = 30.0  # seconds between lines when the stream is not a terminal


def is_terminal(stream: IO[str] | None) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


class _Lines:
    """A file for tqdm that turns each redraw into one line (no ``\\r``, no cursor moves)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A tqdm bar whose postfix and description changes wait for the next line."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)


def progress_bar(
    iterable: Any = None,
    *,
    file: IO[str] | None = None,
    log_seconds: float = LOG_SECONDS,
    **kwargs: Any,
) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on ``file`` (default stderr): redrawn in place on a
    terminal, else a plain line at most every ``log_seconds`` and when it closes (a new
    postfix or description shows on the next line)."""
    stream = sys.stderr if file is None else file
    if is_terminal(stream):
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    kwargs.update(mininterval=log_seconds, maxinterval=max(log_seconds, 10.0), miniters=1)
    return _LogBar(iterable, file=_Lines(stream), ascii=True, **kwargs)
