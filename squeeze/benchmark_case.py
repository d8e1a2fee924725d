"""One ``squeeze bench`` case, measured in a process of its own.

``python -m squeeze.benchmark_case SPEC.json RESULT.json`` loads one model with
:func:`squeeze.load` (so an export runs on the run-times its record installs), times it on the
prompts the parent chose, and writes what it measured. A process per case keeps each model's
peak RSS its own and keeps one model's allocations, caches and thread pools from colouring the
next one's timings; :mod:`squeeze.benchmark` alternates these processes over the rounds.

Causal LMs: ``prefill_ms`` (the batch-1 forward over the prompt, median of :data:`REPEATS`),
``decode_tps_b1`` (:func:`squeeze.generate`, the loop of ``squeeze generate``: self-speculative
when the export records tuned exit settings measured at a speed-up of at least 1.0, plain otherwise; the tokens after the prefill over
the time after it) and ``decode_tps_b8`` (:func:`~squeeze.runtime.speculative.generate_batch`,
greedy, 8 prompts at once). Encoders: ``prefill_ms`` and ``prefill_ms_b8``, the forward over 1
and 8 prompts. Both: ``peak_rss_mb`` of this process once the speed figures are in (the quality
score afterwards loads a second model), ``load_s``, ``runtime`` (the run-time plan ``squeeze.load``
made: sparse or dense path per kind); causal LMs also ``bytes_per_token``, what one batch-1 decode
step reads (:func:`squeeze.roofline.decode_bytes`). A spec with ``bandwidth`` measures the memory's
read bandwidth instead (:func:`bandwidth`). A SqueezeError is written as ``{"error": ...}``
and the process exits with code 2, so the parent can stop with the same one line.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

REPEATS = 3  # prefill / forward timings per round: their median (a single sub-millisecond call is noise)


def measure(spec: dict) -> dict:
    import torch

    from squeeze.loading import load
    from squeeze.report import peak_rss_mb

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = spec["device"]
    if device == "cuda" and not torch.cuda.is_available():
        from squeeze.errors import SqueezeError

        raise SqueezeError("--device cuda: this machine has no CUDA device torch can use")
    t0 = time.perf_counter()
    model = load(spec["path"], dtype=None if spec["dtype"] == "auto" else spec["dtype"], device=device)
    _wait(device)
    out = {"load_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), "dtype": str(model.dtype),
           "runtime": getattr(model, "squeeze_runtime", None) or {}}
    prompts = torch.tensor(spec["prompts"], dtype=torch.long, device=device)  # (8, prompt_len)
    with torch.no_grad():
        out.update(_causal(model, prompts, spec) if spec["kind"] == "causal" else _encoder(model, prompts, device))
    out["peak_rss_mb"] = peak_rss_mb()
    if spec["kind"] == "causal":  # counted after the timings: nothing it touches colours them
        from squeeze.roofline import decode_bytes

        # the KV cache at the measured decode's mean context: the prompt plus half the new tokens
        out["bytes_per_token"] = decode_bytes(model, prompts.shape[1] + spec["new_tokens"] // 2)
    if device == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if spec.get("quality"):
        from squeeze.evaluation import quality

        q = spec["quality"]
        out["quality"] = quality(spec["path"], q["reference"], q["data"], q.get("rows"))
    return out


def bandwidth(spec: dict) -> dict:
    """The memory's read bandwidth (:func:`squeeze.roofline.read_bandwidth`) with the cases'
    thread count, in a process of its own like every case (its GiB-sized tensor stays out of
    their peak RSS)."""
    import torch

    from squeeze.roofline import read_bandwidth

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    return read_bandwidth(spec["bandwidth"]["bytes"], spec["bandwidth"]["repeats"], spec["device"])


def _wait(device: str) -> None:
    if device == "cuda":  # kernels run asynchronously: a clock read needs them finished
        import torch

        torch.cuda.synchronize()


def _causal(model, prompts, spec) -> dict:
    from squeeze.runtime.speculative import generate, generate_batch, speculative_pays

    speculative = speculative_pays(model)  # `squeeze tune-exit` chose exits that it measured faster
    one = prompts[0].tolist()
    generate(model, one, 2, self_speculative=speculative)  # warm-up: first-call costs, run-time plans
    generate_batch(model, prompts, 2)
    prefill = statistics.median(generate_batch(model, prompts[:1], 1)[1]["prefill_seconds"]
                                for _ in range(REPEATS))
    ids, st = generate(model, one, spec["new_tokens"], self_speculative=speculative, return_stats=True)
    decode_s = st["seconds"] - st["prefill_seconds"]
    _, st8 = generate_batch(model, prompts, spec["new_tokens"])
    return {"prefill_ms": prefill * 1e3, "decode_tps_b1": (st["new_tokens"] - 1) / max(decode_s, 1e-9),
            "decode_tps_b8": st8["tokens_per_s"], "new_ids": ids[0, len(one):].tolist(),
            "decode_mode": st["mode"] + (f" (exit layer {st['exit_layer']}, k {st['num_speculations']}, acceptance "
                                         f"{st['acceptance_rate']:.2f})" if speculative else _unused(model))}


def _unused(model) -> str:
    from squeeze.runtime.speculative import saved_settings

    speedup = saved_settings(model).get("speedup")
    return "" if speedup is None else f" (tune-exit measured self-speculative at {float(speedup):.2f}x: not used)"


def _encoder(model, prompts, device) -> dict:
    def forward_s(ids) -> float:
        mask = ids.new_ones(ids.shape)
        model(input_ids=ids, attention_mask=mask)  # warm-up
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            _wait(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return {"prefill_ms": forward_s(prompts[:1]) * 1e3, "prefill_ms_b8": forward_s(prompts) * 1e3}


def main(spec_path: str, result_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec["device"] == "cpu":  # as the `squeeze` program: a CPU user's process carries no Triton
        from squeeze.lean import skip_unused_packages

        skip_unused_packages()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from squeeze.errors import SqueezeError
    from squeeze.report import write_json

    try:
        result = bandwidth(spec) if spec.get("bandwidth") else measure(spec)
    except SqueezeError as e:
        write_json(result_path, {"error": str(e)})
        return e.exit_code
    write_json(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
