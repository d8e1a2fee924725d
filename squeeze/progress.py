"""Progress of long-running phases: announced by the library, shown by whoever installs a sink.

Library code wraps every phase that can take more than a couple of seconds::

    with progress.phase("calibration capture", total=len(batches), unit="batch") as p:
        for batch in batches:
            ...
            p.advance()              # or p.advance(1, loss=0.25): fields shown beside the count

With no sink installed (the Python API's default) :func:`phase` hands out one shared inert
object: an announced loop costs a global read per phase and a no-op call per step, so the API
stays silent and its hot loops as fast as before. The CLI installs a sink for the whole command
(:mod:`squeeze.cli.progress`: a rich bar on a terminal, periodic log lines otherwise).

Phases nest: one opened while another runs is its child (a greedy search inside one block of the
sweep), and a sink sees the chain through ``Phase.parent``. A sink is any object with
``started(phase)``, ``advanced(phase)`` and ``finished(phase, error)``; ``finished`` gets the
exception a phase ended by (Ctrl-C included), so the display is stopped before the CLI prints its
one error line. Phases are announced from the thread that runs the work; sinks that draw from a
thread of their own (a heartbeat) only read them.
"""

from __future__ import annotations

import contextlib

_sink = None  # the installed sink, or None: every phase is inert
_muted = 0  # > 0 inside muted(): phases are inert even with a sink
_current: "Phase | None" = None  # innermost running phase


class Phase:
    """One running phase: ``completed`` of ``total`` ``unit``\\ s (``total`` None when unknown)."""

    __slots__ = ("name", "total", "unit", "completed", "initial", "fields", "parent", "depth", "_sink")

    def __init__(self, name: str, total: int | None, unit: str, completed: int, sink):
        self.name, self.total, self.unit, self._sink = name, total, unit, sink
        self.completed = self.initial = completed  # initial: a resumed run's start, for honest rates
        self.fields: dict = {}
        self.parent: Phase | None = None
        self.depth = 0

    def advance(self, n: int = 1, **fields) -> None:
        self.completed += n
        if fields:
            self.fields.update(fields)
        self._sink.advanced(self)

    def update(self, completed: int | None = None, total: int | None = None, **fields) -> None:
        """Set the count (or the total, once it is known) instead of adding to it."""
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if fields:
            self.fields.update(fields)
        self._sink.advanced(self)

    def __enter__(self) -> "Phase":
        global _current
        self.parent, _current = _current, self
        self.depth = 0 if self.parent is None else self.parent.depth + 1
        self._sink.started(self)
        return self

    def __exit__(self, kind, error, tb) -> None:
        global _current
        _current = self.parent
        self._sink.finished(self, error)


class _Inert:
    """What :func:`phase` returns when nobody listens: every method does nothing."""

    __slots__ = ()
    name, total, unit, completed, initial, parent, depth = "", None, "", 0, 0, None, 0
    fields: dict = {}

    def advance(self, n: int = 1, **fields) -> None:
        pass

    def update(self, completed=None, total=None, **fields) -> None:
        pass

    def __enter__(self) -> "_Inert":
        return self

    def __exit__(self, *exc) -> None:
        pass


_INERT = _Inert()


def phase(name: str, total: int | None = None, unit: str = "step", completed: int = 0) -> Phase | _Inert:
    """A context manager for one phase; ``unit`` is singular ("block", "step", "token")."""
    if _sink is None or _muted:
        return _INERT
    return Phase(name, None if total is None else int(total), unit, completed, _sink)


def enabled() -> bool:
    """Whether phases are shown: lets code skip preparing fields nobody will see."""
    return _sink is not None and not _muted


@contextlib.contextmanager
def installed(sink):
    """Show the phases announced inside this block through ``sink`` (replacing any other)."""
    global _sink, _current
    previous, outer = _sink, _current
    _sink, _current = sink, None
    try:
        yield sink
    finally:
        _sink, _current = previous, outer


@contextlib.contextmanager
def muted():
    """Phases announced inside this block are not shown (a caller that asked for quiet work)."""
    global _muted
    _muted += 1
    try:
        yield
    finally:
        _muted -= 1
