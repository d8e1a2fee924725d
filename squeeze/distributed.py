"""Distributed calibration: the few collectives the sweep needs, over ``torch.distributed``.

Started by ``torchrun`` (or ``squeeze compress --nproc N``, which launches the same through
``torch.distributed.run``), every rank runs the whole sweep on its own contiguous share of the
calibration batches (:func:`split`); between a stage's statistics forward and its decisions the
passes combine their statistics here (``BlockPass.reduce_statistics``), so every rank decides
the same thing; only rank 0 writes (:func:`is_writer`).

Without a process group (one process, the API, the tests) every helper is a no-op that returns
its argument: nothing changes and nothing is paid.

Failures: every collective here starts with a one-int status exchange, so a rank that fails
(:func:`fail`, from ``squeeze.compress``'s handler) meets its peers at their next collective,
and all ranks raise the same one-line :class:`PeerFailed` instead of waiting forever.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from squeeze.errors import SqueezeError


class PeerFailed(SqueezeError):
    """Raised on every rank when some rank failed; already agreed, so not reported again."""


def _dist():
    import torch.distributed as d

    return d if d.is_available() and d.is_initialized() else None


def active() -> bool:
    """True when more than one process takes part."""
    d = _dist()
    return d is not None and d.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world() -> int:
    return _dist().get_world_size() if active() else 1


def describe() -> dict:
    return {"processes": world(), "backend": _dist().get_backend(), "batches": "contiguous share per rank"}


def is_writer() -> bool:
    """Only rank 0 writes the export, the report and the progress."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or ``--nproc``) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (once). gloo on CPU; nccl when
    there is a GPU per local rank (statistics then travel through the GPU and back; the sweep itself is on CPU).
    A long timeout: rank 0 may spend a while writing and scoring the export while the others wait
    at the final agreement; a rank that dies is noticed by torchrun, which stops the others."""
    import torch.distributed as d

    if not launched() or d.is_initialized():
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = os.environ.get("SQUEEZE_DIST_BACKEND") or ("nccl" if gpus >= local else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    d.init_process_group(backend, timeout=timedelta(seconds=float(os.environ.get("SQUEEZE_DIST_TIMEOUT", 6 * 3600))))


def shutdown() -> None:
    d = _dist()
    if d is not None:
        d.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _dist().get_backend() == "nccl" \
        else torch.device("cpu")


def _status(failed: str | None = None) -> None:
    """Every collective's preamble: does any rank bring a failure? Then all raise it, once."""
    d = _dist()
    flag = torch.tensor([0 if failed is None else 1], dtype=torch.int64, device=_device())
    d.all_reduce(flag)
    if int(flag) == 0:
        return
    messages: list = [None] * d.get_world_size()
    d.all_gather_object(messages, failed)
    bad = [(r, m) for r, m in enumerate(messages) if m is not None]
    if len(bad) == len(messages):  # every rank failed alike (bad input): say it as one process would
        raise PeerFailed(bad[0][1])
    raise PeerFailed(f"rank {bad[0][0]} of {len(messages)}: {bad[0][1]}")


def fail(message: str) -> None:
    """Called by a rank that failed: meet the others at their next collective and raise there."""
    if active():
        _status(message)


def agree() -> None:
    """The last collective of a run: every rank finishes with the same outcome (and exit code)."""
    if active():
        _status()


# -- the helpers the passes use ------------------------------------------------------------------
def sum_(t: torch.Tensor) -> torch.Tensor:
    """In place: the sum of ``t`` over the ranks. The order of the additions is the backend's, so
    the result may differ from one process's sequential sum in the last bits (Hessians)."""
    if active():
        _status()
        dev = _device()
        buf = t.to(dev)
        _dist().all_reduce(buf)
        if buf is not t:
            t.copy_(buf)
    return t


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The rows of every rank's ``t`` [k_r, ...] concatenated in rank order (a copy, no arithmetic:
    exact). Ranks hold contiguous shares of the batches, so rank order is batch order."""
    if not active():
        return t
    _status()
    d, dev = _dist(), _device()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(d.get_world_size())]
    d.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    most = max(sizes)
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    d.all_gather(parts, padded)
    return torch.cat([p[:k].to(t.device) for p, k in zip(parts, sizes)])


def from_rank0(obj):
    """Rank 0's ``obj`` on every rank (picklable objects: decisions taken on rank 0's data)."""
    if not active():
        return obj
    _status()
    box = [obj if rank() == 0 else None]
    _dist().broadcast_object_list(box, src=0, device=_device() if _dist().get_backend() == "nccl" else None)
    return box[0]


def split(items: list, what: str = "calibration batches") -> list:
    """This rank's contiguous share of ``items`` (rank 0 the first ones): concatenated in rank
    order they are ``items`` again, which is what makes combined statistics add up in the order
    one process adds them."""
    if not active():
        return items
    n, r = world(), rank()
    if len(items) < n:
        raise SqueezeError(f"{n} processes need at least {n} {what}, and this calibration makes {len(items)} "
                           f"(up to 4096 tokens each): use more --nsamples or fewer processes")
    return items[r * len(items) // n:(r + 1) * len(items) // n]


def refuse(what: str) -> None:
    """One clear line for work that is not distributed (yet): never compute something different."""
    if active():
        raise SqueezeError(f"{what} is not supported with {world()} processes: run it in one process "
                           "(without --nproc / torchrun)")



def launch(nproc: int, argv: list[str]) -> int:
    """``squeeze ARGV`` in ``nproc`` processes through ``torch.distributed.run`` (what torchrun
    runs: the same rendezvous and environment), on this machine; returns the workers' exit code.
    Rank 0 already printed any error line, so torchrun's failure summary is left out."""
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nproc < 1:
        raise SqueezeError(f"--nproc must be >= 1, got {nproc}")
    # torchrun would set 1 thread per worker and warn; split the cores between the workers instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "squeeze.cli.main", *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
    return 0
