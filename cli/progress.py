"""How the CLI shows the library's phases (:mod:`squeeze.progress`) on stderr.

``command_sink()`` is installed around every command (``squeeze.cli.main.main``):

- stderr is a terminal: a rich bar per running phase (description, bar, n/total, elapsed,
  remaining, fields such as the loss); a nested phase gets its own indented bar once it has run
  for ``delay`` seconds; a top-level phase that took that long leaves a ``✓ name ... in X s``
  line. The bars are transient: once the last phase ends nothing of them remains, so a report
  or an error line is printed on a clean screen.
- otherwise (a file, a pipe, CI): plain one-line records, no ANSI codes::

      [squeeze] compress: block 3/6 (50%), 12.1 s elapsed, ~12 s left
      [squeeze] compress: done, block 6/6 in 24.3 s

  A top-level phase is logged once it has run for ``delay`` seconds (2; phases that end sooner
  stay silent), then at most every ``interval`` seconds (10) a line shows the running phases,
  outer to inner (``compress: block 3/6 ... > greedy allocation: 48 trials ...``; a nested
  phase joins once it has run ``delay`` seconds); a heartbeat thread writes that line also
  while a phase reports nothing (loading one large file). Every logged phase ends with a line
  giving its total time, or where it stopped.

``SQUEEZE_PROGRESS`` = ``auto`` (default) | ``bar`` | ``log`` | ``off`` overrides the choice;
``SQUEEZE_PROGRESS_INTERVAL`` = seconds between log lines (0: every step; the delay is at most it).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time

from squeeze import progress
from squeeze.errors import SqueezeError

MODES = ("auto", "bar", "log", "off")


# -- text of a phase -----------------------------------------------------------------------------
def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def count_text(p, percent: bool = True) -> str:
    """``block 3/6 (50%)`` with a total; ``48 trials`` without one; "" before the first step."""
    if p.total:
        return f"{p.unit} {p.completed}/{p.total}" + (f" ({100 * p.completed // p.total}%)" if percent else "")
    if p.completed:
        return f"{p.completed} {p.unit if p.completed == 1 else _plural(p.unit)}"
    return ""


def fields_text(p) -> str:
    # a copy in one step: the heartbeat thread reads fields the working thread may be adding to
    items = tuple(p.fields.items())
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items)


def duration(seconds: float, tenths: bool = True) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s" if tenths else f"{seconds:.0f} s"  # an estimate has no tenths
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def remaining(p, elapsed: float) -> float | None:
    """Seconds left at this run's own rate (a resumed phase's earlier steps do not count)."""
    done = p.completed - p.initial
    if not p.total or done <= 0 or elapsed <= 0:
        return None
    return max(0.0, (p.total - p.completed) * elapsed / done)


def _chain(p) -> list:
    out = []
    while p is not None:
        out.append(p)
        p = p.parent
    return out[::-1]


def _error_text(error: BaseException) -> str:
    return "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"


# -- not a terminal: log lines ----------------------------------------------------------------
class LogSink:
    """Throttled one-line records (see the module docstring). ``clock`` is injectable for tests."""

    def __init__(self, stream=None, interval: float = 10.0, delay: float = 2.0, clock=time.monotonic,
                 prefix: str = "[squeeze]"):
        self.stream, self.interval, self.delay, self.clock, self.prefix = stream, interval, delay, clock, prefix
        self._start: dict = {}  # running phase -> when it started
        self._shown: set = set()  # running phases already logged
        self._last = -math.inf  # when the last line was written
        self._leaf = None  # innermost running phase, for the heartbeat
        self._lock = threading.Lock()

    def started(self, p) -> None:
        with self._lock:
            now = self.clock()
            self._start[p] = now
            self._leaf = p
            self._consider(p, now)

    def advanced(self, p) -> None:
        with self._lock:
            self._consider(p, self.clock())

    def tick(self) -> None:
        """The heartbeat: log the running phases if a line is due although nobody advanced."""
        with self._lock:
            if self._leaf is not None:
                self._consider(self._leaf, self.clock())

    def finished(self, p, error) -> None:
        with self._lock:
            now = self.clock()
            t0 = self._start.pop(p, now)
            self._leaf = p.parent
            if p not in self._shown:
                return
            self._shown.discard(p)
            names = " > ".join(q.name for q in _chain(p))
            count = count_text(p, percent=False)
            if error is None:
                text = f"{names}: done" + (f", {count}" if count else "") + f" in {duration(now - t0)}"
            else:
                text = f"{names}: {_error_text(error)}" + (f" at {count}" if count else "") + \
                    f" after {duration(now - t0)}"
            self._write(text, now)

    def _consider(self, leaf, now: float) -> None:
        # outer phases started first, so the ones old enough to show are a prefix of the chain
        visible = [p for p in _chain(leaf) if now - self._start.get(p, now) >= self.delay]
        if not visible:
            return
        # a new top-level phase is logged at once; anything else (a nested search that has become
        # old enough, another step) waits for the interval, so a sweep of many short inner
        # phases stays at about one line per interval
        if visible[0] not in self._shown or now - self._last >= self.interval:
            self._shown.update(visible)
            self._write(" > ".join(self._status(p, now) for p in visible), now)

    def _status(self, p, now: float) -> str:
        elapsed = now - self._start.get(p, now)
        left = remaining(p, elapsed)
        parts = [x for x in (count_text(p), fields_text(p)) if x]
        parts.append(f"{duration(elapsed)} elapsed")
        if left is not None:
            parts.append(f"~{duration(left, tenths=False)} left")
        return f"{p.name}: " + ", ".join(parts)

    def _write(self, text: str, now: float) -> None:
        self._last = now
        stream = self.stream or sys.stderr
        stream.write(f"{self.prefix} {text}\n")
        stream.flush()

    @contextlib.contextmanager
    def running(self, beat: float = 0.5):
        """A heartbeat thread for the duration of a command."""
        stop = threading.Event()

        def beat_loop():
            while not stop.wait(beat):
                self.tick()

        thread = threading.Thread(target=beat_loop, name="squeeze-progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()


# -- a terminal: rich bars --------------------------------------------------------------------
class BarSink:
    """A rich progress display on stderr, live only while a phase runs."""

    def __init__(self, console=None, delay: float = 2.0, clock=time.monotonic):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.delay, self.clock = delay, clock
        self._bar = None
        self._tasks: dict = {}  # running phase -> (rich task id, start time)

    def _display(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=self.console, transient=True)

    def started(self, p) -> None:
        if self._bar is None:
            self._bar = self._display()
            self._bar.start()
        task = self._bar.add_task("  " * p.depth + p.name, total=p.total, completed=p.completed,
                                  count=_bar_count(p), info=fields_text(p), visible=p.depth == 0)
        self._tasks[p] = (task, self.clock())

    def advanced(self, p) -> None:
        task, t0 = self._tasks[p]
        # a nested phase shows once it has run a while: a sweep's quick inner searches do not flicker
        self._bar.update(task, total=p.total, completed=p.completed, count=_bar_count(p), info=fields_text(p),
                         visible=p.depth == 0 or self.clock() - t0 >= self.delay)

    def finished(self, p, error) -> None:
        task, t0 = self._tasks.pop(p)
        self._bar.remove_task(task)
        secs = self.clock() - t0
        if error is None and p.depth == 0 and secs >= self.delay:
            count = count_text(p, percent=False)
            self._bar.console.print(f"[green]✓[/] {p.name}" + (f": {count}" if count else "") +
                                    f" in {duration(secs)}", highlight=False)
        if not self._tasks:
            self.stop()

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    @contextlib.contextmanager
    def running(self):
        try:
            yield self
        finally:
            self.stop()


def _bar_count(p) -> str:
    if p.total:
        return f"{p.completed}/{p.total} {_plural(p.unit)}"
    return count_text(p)


# -- the choice ---------------------------------------------------------------------------------
@contextlib.contextmanager
def command_sink():
    """Show the phases of one command on stderr: bars on a terminal, log lines otherwise."""
    mode = os.environ.get("SQUEEZE_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise SqueezeError(f"SQUEEZE_PROGRESS={mode!r}: use one of {', '.join(MODES)}")
    if mode == "off":
        yield None
        return
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"):
        sink = BarSink()
    else:
        raw = os.environ.get("SQUEEZE_PROGRESS_INTERVAL", "10")
        try:
            interval = float(raw)
        except ValueError:
            raise SqueezeError(f"SQUEEZE_PROGRESS_INTERVAL={raw!r}: give seconds, e.g. 10") from None
        sink = LogSink(interval=max(0.0, interval), delay=min(2.0, max(0.0, interval)))
    with progress.installed(sink), sink.running():
        yield sink
