"""Load-time plans: does a run-time's sparse path pay on this machine, for this model's shapes?

Activation-sparse linears (TEAL / WINA), the dReLU chunk-sparse FFN and CPU 2:4 linears each have
a *sparse* path (a kernel that skips work) and a *dense* path (the ordinary dense kernel: the same
function, except for activation-sparse linears, whose dense path also drops the mask that only the
sparse kernel profits from; see :mod:`squeeze.runtime.act_sparse`). Which one is faster depends on
the shape, dtype, sparsity level, thread count and machine: on a 1B model the input-sparse GEMV wins at 50%; at hidden 64 (stories260k) its
per-call overhead costs more than the whole dense GEMV. So ``squeeze.load`` asks every run-time
for its :class:`Candidate` modules, times both paths once per distinct key on a synthetic
batch-1 decode input (median of alternating samples, cycling over the key's modules as decode
does; a few ms to ~100 ms per key), and installs
the faster one; the sparse path must win by :data:`MARGIN` (timing noise must not make a model
slower than dense).

Timings are cached per machine in ``$SQUEEZE_CACHE/plans/`` (default ``~/.cache/squeeze/plans/``),
one JSON per (CPU model, torch version, thread count), written atomically; an unreadable file is
ignored and rewritten. ``runtime="sparse"|"dense"`` (``squeeze.load``) or ``SQUEEZE_RUNTIME``
skips the measurement. Nothing here knows a run-time: candidates bring their own key, benchmark
and switch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from squeeze.errors import SqueezeError
from squeeze.versions import cpu_model

MODES = ("auto", "sparse", "dense")
ENV_MODE = "SQUEEZE_RUNTIME"
ENV_CACHE = "SQUEEZE_CACHE"
MARGIN = 1.05  # sparse only when measured >= 5% faster than dense
REPEATS = 5  # samples per path (their median)
SAMPLE_S = 2e-3  # one sample repeats the call until it lasts about this long (a small GEMV is ~us)
MAX_CALLS = 256
ROTATE = 32  # modules of one key a measurement cycles through
METHOD = 7  # how timings are taken (2: cycling over a key's modules; 3: bags split per thread; 4: int8 through our
# own kernel; 5: activation-sparse paths in their decode steady state; 6: their dense path unmasked; 7: bags through
# our own row kernel); older cached timings are not reused


@dataclass
class Candidate:
    """One module whose path can be chosen. ``key`` holds everything its speed depends on (same
    key, same decision: measured once); ``bench()`` builds the two zero-argument callables to time
    (sparse, dense) on the same synthetic input, only when the key is not cached; ``apply(path)``
    installs "sparse" or "dense". ``dense_means``: what the dense path computes when that is not
    the sparse path's function (said beside the decision)."""

    kind: str
    key: tuple
    bench: Callable[[], tuple[Callable, Callable]]
    apply: Callable[[str], None]
    dense_means: str = ""


@dataclass
class Decision:
    kind: str
    key: str
    path: str  # "sparse" | "dense"
    how: str  # "measured" | "cached" | "forced"
    ratio: float | None = None  # dense seconds / sparse seconds (> 1: the sparse path is faster)
    sparse_us: float | None = None
    dense_us: float | None = None
    modules: int = 0
    dense_means: str = ""

    def as_dict(self) -> dict:
        d = {"kind": self.kind, "key": self.key, "path": self.path, "how": self.how, "modules": self.modules}
        if self.dense_means and self.path == "dense":
            d["dense_means"] = self.dense_means
        if self.ratio is not None:
            d.update(ratio=round(self.ratio, 3), sparse_us=round(self.sparse_us, 2), dense_us=round(self.dense_us, 2))
        return d


def resolve_mode(runtime: str | None) -> str:
    """``runtime`` argument, else ``$SQUEEZE_RUNTIME``, else "auto"."""
    mode = runtime if runtime is not None else (os.environ.get(ENV_MODE) or "auto")
    if mode not in MODES:
        where = "runtime" if runtime is not None else f"${ENV_MODE}"
        raise SqueezeError(f"{where} must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


# -- machine and cache -------------------------------------------------------------------------
def machine(threads: int | None = None) -> dict:
    """What a plan is valid for: the same CPU, torch build, intra-op thread count and build of our
    C kernels (none where SQUEEZE_NATIVE=0 or no compiler: other kernels, other timings)."""
    from squeeze.kernels import cpu_native

    return {"cpu": cpu_model(), "torch": torch.__version__,
            "threads": int(threads if threads is not None else torch.get_num_threads()),
            "method": METHOD, "native": cpu_native.isa()}


def cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE)
    return (Path(root) if root else Path.home() / ".cache" / "squeeze") / "plans"


class PlanCache:
    """{key: timings} for one machine, in ``<dir>/<hash of machine>.json``."""

    def __init__(self, folder: str | Path | None = None, machine_info: dict | None = None):
        self.machine = machine_info or machine()
        slug = hashlib.sha1(json.dumps(self.machine, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(folder or cache_dir()) / f"{slug}.json"
        self.entries = self._read()
        self.dirty = False

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # missing or corrupt: measured again and rewritten
        if not isinstance(data, dict) or data.get("machine") != self.machine or not isinstance(data.get("plans"), dict):
            return {}
        return {k: v for k, v in data["plans"].items()
                if isinstance(v, dict) and _positive(v.get("sparse_s")) and _positive(v.get("dense_s"))}

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, sparse_s: float, dense_s: float) -> None:
        self.entries[key] = {"sparse_s": sparse_s, "dense_s": dense_s}
        self.dirty = True

    def save(self) -> None:
        """Merge with what another process wrote meanwhile, then replace the file atomically. A
        cache that cannot be written (read-only home) only costs a re-measurement next time."""
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(), **self.entries}
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            try:
                tmp.write_text(json.dumps({"machine": self.machine, "plans": merged}, indent=1, sort_keys=True))
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
            self.dirty = False
        except OSError:
            pass


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and v > 0


# -- timing --------------------------------------------------------------------------------------
def default_clock() -> Callable[[], float]:
    # One thread: this process's CPU time, which leaves out time descheduled by other jobs on a
    # shared machine. Several threads: CPU time would sum them, so wall time.
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def time_paths(sparse_fn: Callable, dense_fn: Callable, repeats: int = REPEATS,
               clock: Callable[[], float] | None = None) -> tuple[float, float]:
    """(sparse, dense) seconds per call: the median of ``repeats`` samples each, alternating the
    paths so a change in machine load hits both alike."""
    clock = clock or default_clock()
    with torch.no_grad():
        sparse_fn(), dense_fn()  # warm-up: lazy weight copies, allocator, first-call dispatch
        t0 = clock()
        dense_fn()
        one = max(clock() - t0, 1e-7)
        n = int(min(max(SAMPLE_S / one, 1), MAX_CALLS))
        s, d = [], []
        for _ in range(repeats):
            s.append(_sample(sparse_fn, n, clock))
            d.append(_sample(dense_fn, n, clock))
    return statistics.median(s) / n, statistics.median(d) / n


def _sample(fn, n: int, clock) -> float:
    t0 = clock()
    for _ in range(n):
        fn()
    return clock() - t0


def _rotations(group: list[Candidate]) -> tuple[Callable, Callable]:
    """(sparse, dense) callables that each call the next module of the key in turn (up to
    :data:`ROTATE` of them, every one warmed up first). Decode reads each weight once per token, so
    one module timed over and over would run from a cache that decode never sees (this machine's
    L3 holds whole small models); cycling over the key's modules, as decode does, keeps the
    timing on the memory traffic the model really has."""
    pairs = [c.bench() for c in group[:ROTATE]]
    with torch.no_grad():
        for sparse_fn, dense_fn in pairs:  # lazy weight copies, first-call dispatch
            sparse_fn(), dense_fn()
    sparse, dense = itertools.cycle([p[0] for p in pairs]), itertools.cycle([p[1] for p in pairs])
    return (lambda: next(sparse)()), (lambda: next(dense)())


def choose(sparse_s: float, dense_s: float, margin: float = MARGIN) -> str:
    return "sparse" if sparse_s * margin <= dense_s else "dense"


def key_text(kind: str, key: tuple) -> str:
    return "|".join([kind, *map(str, key)])


# -- the planner ---------------------------------------------------------------------------------
def plan(candidates: list[Candidate], mode: str = "auto", cache: PlanCache | None = None,
         clock: Callable[[], float] | None = None) -> list[Decision]:
    """Decide and apply a path for every candidate; one :class:`Decision` per distinct key."""
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(key_text(c.kind, c.key), []).append(c)
    if not groups:
        return []
    if mode != "auto":
        out = [Decision(g[0].kind, k, mode, "forced", modules=len(g), dense_means=g[0].dense_means)
               for k, g in groups.items()]
    else:
        cache = cache if cache is not None else PlanCache()
        out = []
        for k, g in groups.items():
            hit = cache.get(k)
            if hit is None:
                s, d = time_paths(*_rotations(g), clock=clock)
                cache.put(k, s, d)
                how = "measured"
            else:
                s, d, how = hit["sparse_s"], hit["dense_s"], "cached"
            out.append(Decision(g[0].kind, k, choose(s, d), how, d / s, s * 1e6, d * 1e6, len(g), g[0].dense_means))
        cache.save()
    for dec in out:
        for c in groups[dec.key]:
            c.apply(dec.path)
    return out


def summary(decisions: list[Decision]) -> dict[str, dict]:
    """Per run-time kind: how many modules run each path and the measured speed-up range of the
    sparse path (dense seconds / sparse seconds), what ``info`` and ``bench`` print."""
    out: dict[str, dict] = {}
    for d in decisions:
        s = out.setdefault(d.kind, {"sparse": 0, "dense": 0, "ratios": [], "how": set()})
        s[d.path] += d.modules
        s["how"].add(d.how)
        if d.path == "dense" and d.dense_means:
            s["dense_means"] = d.dense_means
        if d.ratio is not None:
            s["ratios"].append(d.ratio)
    for s in out.values():
        r = s.pop("ratios")
        s["ratio_min"], s["ratio_max"] = (round(min(r), 3), round(max(r), 3)) if r else (None, None)
        s["how"] = "/".join(sorted(s["how"]))
    return out


def summary_line(kind: str, s: dict) -> str:
    """e.g. "act_sparse: dense path on 35 modules, activations unmasked (sparse path runs at
    0.20-0.23x the dense path's speed; measured)"."""
    n = s["sparse"] + s["dense"]
    path = "sparse" if s["sparse"] == n else "dense" if s["dense"] == n else "mixed"
    head = f"{kind}: {path} path" + ("" if path != "mixed" else f" (sparse on {s['sparse']})") + f" on {n} modules"
    if s.get("dense_means"):
        head += f", {s['dense_means']}" + (" on the dense ones" if path == "mixed" else "")
    if s.get("ratio_min") is None:
        return head + f" ({s['how']})"
    lo, hi = s["ratio_min"], s["ratio_max"]
    speed = f"{lo:.2f}x" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}x"
    return head + f" (sparse path runs at {speed} the dense path's speed; {s['how']})"
