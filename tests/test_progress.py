"""squeeze.progress (phases announced by the library) and the CLI's sinks (squeeze.cli.progress)."""

import io

import pytest
from squeeze.cli.progress import BarSink, LogSink, count_text

from squeeze import progress


class Recorder:
    """A sink that writes down every event as (event, name, depth, completed, total)."""

    def __init__(self):
        self.events = []

    def started(self, p):
        self.events.append(("start", p.name, p.depth, p.completed, p.total))

    def advanced(self, p):
        self.events.append(("advance", p.name, p.depth, p.completed, p.total))

    def finished(self, p, error):
        self.events.append(("finish", p.name, p.depth, p.completed, type(error).__name__ if error else None))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_no_sink_is_inert_and_silent(capsys):
    assert not progress.enabled()
    with progress.phase("work", total=3, unit="block") as p:
        p.advance()
        p.update(completed=3, loss=0.5)
        with progress.phase("inner") as q:
            q.advance()
    assert p is q  # one shared inert object: nothing is allocated per phase
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_phases_nest_and_know_their_totals():
    rec = Recorder()
    with progress.installed(rec):
        assert progress.enabled()
        with progress.phase("compress", total=2, unit="block") as outer:
            assert outer.total == 2 and outer.depth == 0 and outer.parent is None
            with progress.phase("greedy allocation", unit="trial") as inner:
                assert inner.parent is outer and inner.depth == 1
                inner.advance(3)
            outer.advance()
            with progress.phase("greedy allocation", unit="trial") as again:
                assert again.parent is outer  # the finished inner phase is no longer anyone's parent
            outer.advance()
        with progress.phase("writing export", total=5, unit="tensor") as after:
            assert after.parent is None and after.depth == 0
    assert not progress.enabled()
    assert rec.events[:5] == [("start", "compress", 0, 0, 2), ("start", "greedy allocation", 1, 0, None),
                              ("advance", "greedy allocation", 1, 3, None), ("finish", "greedy allocation", 1, 3, None),
                              ("advance", "compress", 0, 1, 2)]
    assert ("finish", "compress", 0, 2, None) in rec.events


def test_a_failing_phase_reports_its_error_and_unwinds():
    rec = Recorder()
    with progress.installed(rec):
        with pytest.raises(KeyboardInterrupt):
            with progress.phase("recovery", total=10):
                with progress.phase("loss over the data"):
                    raise KeyboardInterrupt
        with progress.phase("next") as p:
            assert p.parent is None  # the interrupted phases left the stack
    assert ("finish", "loss over the data", 1, 0, "KeyboardInterrupt") in rec.events
    assert ("finish", "recovery", 0, 0, "KeyboardInterrupt") in rec.events


def test_muted_phases_are_inert_even_with_a_sink():
    rec = Recorder()
    with progress.installed(rec), progress.muted():
        assert not progress.enabled()
        with progress.phase("drelu recovery", total=3) as p:
            p.advance()
    assert rec.events == []


def _log(clock, **kw):
    out = io.StringIO()
    return LogSink(out, clock=clock, **kw), out


def test_log_sink_throttles_and_ends_with_the_total_time():
    clock = Clock()
    sink, out = _log(clock, interval=10.0, delay=2.0)
    with progress.installed(sink):
        with progress.phase("compress", total=100, unit="block") as p:
            for _ in range(100):  # one block every 0.5 s: 50 s in all
                clock.now += 0.5
                p.advance()
    lines = out.getvalue().splitlines()
    assert all(line.startswith("[squeeze] compress: ") for line in lines)
    assert "\x1b" not in out.getvalue()  # no terminal codes in a log
    # first line once the phase has run `delay` seconds, then one at most every `interval`
    assert lines[0] == "[squeeze] compress: block 4/100 (4%), 2.0 s elapsed, ~48 s left"
    assert lines[1].startswith("[squeeze] compress: block 24/100 (24%), 12.0 s elapsed")
    assert len(lines) == 1 + 4 + 1  # at 2 s, 12, 22, 32, 42 s, then the end
    assert lines[-1] == "[squeeze] compress: done, block 100/100 in 50.0 s"


def test_log_sink_keeps_quick_phases_silent_and_logs_slow_nested_ones():
    clock = Clock()
    sink, out = _log(clock, interval=10.0, delay=2.0)
    with progress.installed(sink):
        with progress.phase("calibration data"):
            clock.now += 0.5
        assert out.getvalue() == ""  # ended before the delay: nothing at all
        with progress.phase("compress", total=2, unit="block") as sweep:
            with progress.phase("greedy allocation", unit="trial") as greedy:
                for _ in range(30):
                    clock.now += 1.0
                    greedy.advance(sparsity="0.25/0.50")
            sweep.advance()
            with progress.phase("greedy allocation", unit="trial") as greedy:  # quick: stays silent
                clock.now += 0.1
                greedy.advance()
            sweep.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == ("[squeeze] compress: block 0/2 (0%), 2.0 s elapsed > greedy allocation: 2 trials, "
                        "sparsity 0.25/0.50, 2.0 s elapsed")
    assert lines[-2] == "[squeeze] compress > greedy allocation: done, 30 trials in 30.0 s"
    assert lines[-1] == "[squeeze] compress: done, block 2/2 in 30.1 s"
    assert len(lines) == 5  # visible at 2.5 s, due again at 12.5 and 22.5 s, then the two ends


def test_log_sink_many_short_nested_phases_stay_within_the_interval():
    clock = Clock()
    sink, out = _log(clock, interval=10.0, delay=2.0)
    with progress.installed(sink):
        with progress.phase("compress", total=20, unit="block") as sweep:
            for _ in range(20):  # 20 blocks, each a 3 s greedy search: 60 s
                with progress.phase("greedy allocation", unit="trial") as greedy:
                    for _ in range(6):
                        clock.now += 0.5
                        greedy.advance()
                sweep.advance()
    lines = out.getvalue().splitlines()
    status = [ln for ln in lines if ": done" not in ln]
    # a status line at 2 s, then one per 10 s; an inner search gets its end line only if it was shown
    assert len(status) == 6, lines
    assert len(lines) - len(status) == sum("greedy allocation:" in ln for ln in status) + 1
    assert lines[-1] == "[squeeze] compress: done, block 20/20 in 1 min 00 s"


def test_log_sink_heartbeat_and_interruption():
    clock = Clock()
    sink, out = _log(clock, interval=10.0, delay=2.0)
    with progress.installed(sink):
        with pytest.raises(KeyboardInterrupt):
            with progress.phase("recovery", total=100, completed=40, unit="step") as p:
                clock.now += 1.0
                sink.tick()  # nothing is due yet
                assert out.getvalue() == ""
                clock.now += 1.5
                sink.tick()  # a phase that reports nothing (one long step) still shows up
                p.advance(loss=0.123456)
                clock.now += 1.0
                raise KeyboardInterrupt
    lines = out.getvalue().splitlines()
    assert lines == ["[squeeze] recovery: step 40/100 (40%), 2.5 s elapsed",
                     "[squeeze] recovery: interrupted at step 41/100 after 3.5 s"]


def test_log_sink_remaining_time_counts_this_runs_steps_only():
    clock = Clock()
    sink, out = _log(clock, interval=0.0, delay=0.0)
    with progress.installed(sink):
        with progress.phase("recovery", total=100, completed=50, unit="step") as p:
            clock.now += 5.0
            p.advance(5)  # 5 steps in 5 s: 45 left at one a second
    assert "step 55/100 (55%), 5.0 s elapsed, ~45 s left" in out.getvalue()


def test_counts():
    class P:
        total, completed, unit = None, 0, "batch"

    p = P()
    assert count_text(p) == ""
    p.completed = 3
    assert count_text(p) == "3 batches"
    p.total = 6
    assert count_text(p) == "batch 3/6 (50%)"


def test_bar_sink_draws_on_its_console_and_clears_at_the_end():
    from rich.console import Console

    buf = io.StringIO()
    clock = Clock()
    sink = BarSink(Console(file=buf, force_terminal=True, width=120), delay=2.0, clock=clock)
    with progress.installed(sink), sink.running():
        with progress.phase("recovery", total=4, unit="step") as p:
            for _ in range(4):
                clock.now += 1.0
                p.advance(loss=0.5)
        assert sink._bar is None  # no live display between phases: reports print on a clean screen
    assert "recovery: step 4/4 in 4.0 s" in buf.getvalue()


def test_compress_announces_its_phases_and_nests_the_greedy_search(tiny_dir, tiny_calib, tmp_path):
    import squeeze

    rec = Recorder()
    with progress.installed(rec):
        squeeze.compress(tiny_dir("llama"), tmp_path / "t", method="teal", act_sparsity=0.5, allocation="greedy",
                         greedy_step=0.25, calib=str(tiny_calib), nsamples=4, seqlen=16)
    starts = [(name, depth, total) for ev, name, depth, _, total in rec.events if ev == "start"]
    assert ("calibration data", 0, None) in starts
    assert ("calibration capture", 0, 1) in starts
    assert ("compress", 0, 2) in starts  # the block count, known before the first block
    assert starts.count(("greedy allocation", 1, None)) == 2  # one search inside each block
    sweep = [ev for ev in rec.events if ev[1] == "compress"]
    assert [ev[3] for ev in sweep if ev[0] == "advance"] == [1, 2]
    assert sweep[-1] == ("finish", "compress", 0, 2, None)
    assert not progress.enabled()
