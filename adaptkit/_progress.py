"""Progress of long loops: a tqdm bar on a terminal, a few summary lines anywhere else.

On a terminal (or in a Jupyter kernel) a loop gets a transient tqdm bar, when tqdm is installed. Elsewhere
(CI logs, ``| tee``, redirected files) tqdm would write a line per update and fill the log, so the loop
prints a few lines instead, to the same stream: one at the start, one at every quarter when its length is
known, and one at the end, each with the elapsed seconds.

Example:
    >>> import io
    >>> from adaptkit._progress import progress
    >>> log = io.StringIO()  # not a terminal
    >>> sum(progress(range(8), 8, "sum", stream=log))
    28
    >>> print(log.getvalue(), end="")  # doctest: +ELLIPSIS
    sum: 8 steps
    sum: 2/8 (25%), ... s
    sum: 4/8 (50%), ... s
    sum: 6/8 (75%), ... s
    sum: done, 8 steps in ... s
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")

#: fractions of a loop of known length after which a non-terminal log gets a line (plus start and end)
MARKS = (0.25, 0.5, 0.75)


def progress(
    it: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True, *, stream: IO[str] | None = None
) -> Iterable[T]:
    """``it``, reporting its progress on ``stream`` (default: ``sys.stderr``) unless ``enabled`` is False.

    Args:
        it: the loop's iterable.
        total: its number of items (default: ``len(it)`` when it has one).
        desc: the label of the bar or of the log lines.
        enabled: ``False`` returns ``it`` itself (the ``progress=`` flags of adaptkit's loops).
        stream: where to report; a terminal gets a tqdm bar, anything else summary lines.

    Returns:
        An iterable over the same items.
    """
    if not enabled:
        return it
    out = sys.stderr if stream is None else stream
    if out is None:  # no stderr (pythonw): nowhere to report
        return it
    if total is None:
        try:
            total = len(it)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if is_interactive(out):
        try:
            from tqdm.auto import tqdm
        except ImportError:  # progress bars are optional (pip install adaptkit[bench]): log lines instead
            pass
        else:
            return tqdm(it, total=total, desc=desc, leave=False, file=out)
    return _lines(it, total, desc or "progress", out)


def is_interactive(stream: Any) -> bool:
    """Whether ``stream`` is a terminal, or the output of a Jupyter kernel (where tqdm draws a widget)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # pragma: no cover - an IPython without get_ipython
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _say(stream: IO[str], text: str) -> None:
    print(text, file=stream, flush=True)


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _lines(it: Iterable[T], total: int | None, desc: str, stream: IO[str]) -> Iterator[T]:
    t0 = time.perf_counter()
    marks = sorted({math.ceil(total * f) for f in MARKS} - {0, total}) if total else []
    _say(stream, f"{desc}: {_steps(total)}" if total is not None else f"{desc}: started")
    done = 0
    for item in it:
        yield item
        done += 1
        if marks and done == marks[0]:
            marks.pop(0)
            _say(stream, f"{desc}: {done}/{total} ({100 * done / total:.0f}%), {time.perf_counter() - t0:.1f} s")
    _say(stream, f"{desc}: done, {_steps(done)} in {time.perf_counter() - t0:.1f} s")
