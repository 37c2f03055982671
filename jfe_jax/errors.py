"""Expected failures, as the ``jfe`` command reports them: one line naming the path and cause.

``describe_error`` turns the exceptions a user can cause (bad input, a missing or unreadable
file, a full disk, a checkpoint that cannot be read) into that line; anything else is a bug
and keeps its traceback. ``--debug`` (or ``JFE_DEBUG=1``) shows the traceback of every
failure.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re

# TensorStore (Orbax's writer) reports a full disk in its own error's text, e.g.
# 'RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/20/...": ... No space left on
# device [os_error_code='28']'.
_DISK_FULL = re.compile(r"No space left on device|Disk quota exceeded")
_QUOTED_PATH = re.compile(r'"(/[^"]+|gs://[^"]+)"')


class CheckpointReadError(ValueError):
    """A checkpoint exists but cannot be read (truncated, corrupt, or from another format)."""


def debug_enabled() -> bool:
    """Whether ``JFE_DEBUG`` asks for tracebacks."""
    return os.environ.get("JFE_DEBUG", "").lower() not in ("", "0", "false", "no")


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (``--shard-size``, ``-k``, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _chain(error: BaseException):
    """``error`` and the exceptions it was raised from or during, outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _os_error_line(error: OSError) -> str:
    where = error.filename
    if error.filename2:
        where = f"{error.filename} -> {error.filename2}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        target = f" writing {where}" if where else ""
        return f"no space left on the device{target}; free some space and rerun"
    if isinstance(error, PermissionError):
        return f"permission denied: {where or error}" if where else f"permission denied ({error})"
    if isinstance(error, FileNotFoundError):
        if where:
            return f"no such file or directory: {where}"
        return str(error)
    cause = error.strerror or str(error)
    return f"{cause}: {where}" if where else cause


def describe_error(error: BaseException) -> str | None:
    """The one line to print for an expected failure, or None for a bug (keep the traceback).

    A full disk anywhere in the chain wins over the exception that wrapped it (Orbax and
    TensorStore report a failed write as their own errors).
    """
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            return _os_error_line(link)
        disk_full = _DISK_FULL.search(str(link))
        if disk_full:
            path = _QUOTED_PATH.search(str(link))
            return _os_error_line(
                OSError(errno.ENOSPC, disk_full.group(0), path.group(1) if path else None)
            )
    if isinstance(error, OSError):
        if error.filename is None and error.strerror is None:
            return str(error).splitlines()[0] if str(error) else type(error).__name__
        return _os_error_line(error)
    if isinstance(error, ValueError):
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return lines[0] + (" (--debug for details)" if len(lines) > 1 else "")
    return None


class UsageError(ValueError):
    """A command line that does not parse (reported like any bad input: one line, exit 2)."""


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows every option's default: ``(default: X)``, ``(default: none)`` when it
    is unset, ``(default: off)`` for a flag, or ``(required)``; a help text that names its
    default itself (``default:`` or ``%(default)s``) is kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "default:" in text
            or not action.option_strings
            or action.default is argparse.SUPPRESS
            or isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            return text
        if action.required:
            return f"{text} (required)".strip()
        if isinstance(action, argparse._StoreConstAction):  # store_true / store_false
            return f"{text} (default: off)".strip()
        if action.default is None or action.default == "":
            return f"{text} (default: none)".strip()
        return f"{text} (default: %(default)s)".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise ``UsageError`` (one line pointing at ``--help``)
    instead of printing the usage and exiting, so ``jfe_jax.cli.main`` returns 2 for them as
    for any other bad input. Its help shows every option's default (``HelpFormatter``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class DropBackgroundTracebacks(logging.Filter):
    """Drops Orbax's ERROR records that carry a traceback from its background save threads.

    Orbax logs a failed asynchronous save (a full disk, say) once per thread, each with a
    traceback, and then raises it in the main thread, where the command reports it in one
    line. ``jfe --debug`` keeps them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = "orbax" in (record.pathname or "")
        return not (from_orbax and record.levelno >= logging.ERROR and record.exc_info)
