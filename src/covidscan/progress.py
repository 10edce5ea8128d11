"""Progress that behaves in logs: a tqdm bar on a terminal or in a notebook, a few plain lines elsewhere.

tqdm redraws its bar with carriage returns; written to a file or a CI log, a five-epoch run left
~100 KB of half-drawn bars. :func:`progress` shows tqdm's bar only where it can be redrawn (the
stream is a TTY, or tqdm's notebook widget is active). Anywhere else it logs at most four plain lines
per task (at 25, 50 and 75 % done, and at 100 % when ``leave=True``) through the ``logging`` logger
``covidscan.progress``, so a log keeps the milestones and nothing else. Processes other than rank 0
of a distributed run show nothing. tqdm has no such mode (``disable=None`` only switches it off),
hence this small wrapper.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, Protocol, Self, TextIO, TypeVar, overload

from covidscan.runtime import is_main_process

logger = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
MILESTONES = (0.25, 0.5, 0.75)  # fractions done at which a non-interactive task logs a line


class Progress(Protocol[T_co]):
    """What both kinds of progress offer (a subset of tqdm's interface)."""

    def __iter__(self) -> Iterator[T_co]: ...
    def update(self, n: int = 1) -> Any: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> Any: ...


def _bar_class() -> type:
    """tqdm's notebook widget in Jupyter, its terminal bar elsewhere.

    Not ``tqdm.auto``: its asyncio variant calls ``iter()`` on the wrapped iterable in its constructor,
    so a DataLoader started an extra iterator every epoch (one more draw from torch's RNG, and with
    persistent workers a reset that threw away their first prefetched batches).
    """
    import warnings

    from tqdm.std import TqdmExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=TqdmExperimentalWarning)
        from tqdm.autonotebook import tqdm
    return tqdm


def is_interactive(stream: TextIO) -> bool:
    """True where a redrawn bar makes sense: a terminal, or a notebook with tqdm's widget."""
    from tqdm.std import tqdm as terminal_tqdm

    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or _bar_class() is not terminal_tqdm


@overload
def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    leave: bool = False,
    disable: bool = False,
    stream: TextIO | None = None,
) -> Progress[T]: ...


@overload
def progress(
    iterable: None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    leave: bool = False,
    disable: bool = False,
    stream: TextIO | None = None,
) -> Progress[Any]: ...  # counted with update(n), not iterated


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    leave: bool = False,
    disable: bool = False,
    stream: TextIO | None = None,
) -> Progress[T]:
    """Wrap ``iterable`` (or count ``update(n)`` calls up to ``total``) with progress reporting.

    ``stream`` is where a bar would be drawn (default: ``sys.stderr``, as tqdm); it decides between
    a bar and log lines. Use it like tqdm: iterate over the result, or ``with progress(total=n) as
    bar: bar.update(k)``.
    """
    stream = sys.stderr if stream is None else stream
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not disable and is_main_process() and is_interactive(stream):
        bar = _bar_class()
        return bar(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=stream)
    return LoggedProgress(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable)


class LoggedProgress(Iterable[T]):
    """Counts progress and logs a plain line at each milestone (none when ``disable`` or off rank 0)."""

    def __init__(
        self,
        iterable: Iterable[T] | None,
        *,
        total: int | None,
        desc: str,
        unit: str,
        leave: bool,
        disable: bool,
    ) -> None:
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.leave = leave
        self.silent = disable or not is_main_process()
        self.n = 0
        self.started = time.perf_counter()
        self.logged = 0  # milestones logged so far
        self.closed = False

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("progress(total=...) without an iterable is counted with update(n), not iterated")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError(f"progress {self.desc!r} has no known length")
        return self.total

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.silent or not self.total:
            return
        reached = sum(self.n >= fraction * self.total for fraction in MILESTONES)
        if reached > self.logged:
            self.logged = reached  # one line however many milestones one update crossed
            if self.n < self.total:  # the last step logs (or not) in close()
                self._log()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave and not self.silent:
            self._log()

    def _log(self) -> None:
        seconds = time.perf_counter() - self.started
        rate = f", {self.n / seconds:.3g} {self.unit}/s" if seconds > 0 else ""
        done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        logger.info("%s: %s%s", self.desc or "progress", done, rate)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
