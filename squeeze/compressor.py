"""``squeeze.compress``: checkpoint -> calibration sweep -> atomic export -> report."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from squeeze import distributed
from squeeze.adapters import Adapter
from squeeze.calib.build import build_calibration
from squeeze.errors import SqueezeError
from squeeze.export import Spill, check_output_dir, commit, size_report, staging_dir, write_checkpoint
from squeeze.formats import check_format, kind_of, open_dense
from squeeze.modeling import WeightMap, as_loaded, is_plain, sweep_skeleton
from squeeze.passes.base import BlockPass, ModelContext
from squeeze.evaluation import model_kind
from squeeze.recipe import Recipe, build_passes, flags_recipe, next_step, resolve_recipe
from squeeze.report import peak_rss_mb, write_json

DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class CompressResult:
    out: Path
    report: dict
    model: torch.nn.Module | None = None  # the compressed model in memory, when it was kept
    extra: dict = field(default_factory=dict)


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise SqueezeError(f"bad --dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _agreed(fn):
    """Under torchrun every rank runs ``fn``; a failure on any rank becomes the same one-line
    error on all of them (:mod:`squeeze.distributed`), and no rank returns before all are done."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not distributed.active():
            return fn(*args, **kwargs)
        try:
            result = fn(*args, **kwargs)
        except distributed.PeerFailed:
            raise
        except Exception as e:  # noqa: BLE001 (any failure: the peers must hear of it, or they wait)
            distributed.fail(str(e) if isinstance(e, SqueezeError) else f"{type(e).__name__}: {e}")
            raise
        distributed.agree()
        return result
    return run


@_agreed
def compress(model: str | Path | None = None, out: str | Path | None = None, *, method: str | None = None,
             pattern: str | None = None, sparsity: float | None = None, recipe: str | Path | list | None = None,
             calib: str = "builtin", nsamples: int | None = None, seqlen: int | None = None, seed: int = 0,
             packing: str = "auto", targets: str | None = None, ignore: str | None = None, dtype: str = "auto",
             strict: bool = False, overwrite: bool = False, json_path: str | Path | None = None,
             keep_in_memory: bool | None = None, trust_remote_code: bool = False, on_block=None,
             calib_generate: int = 0, calib_generate_mode: str = "sample", calib_generate_temperature: float = 1.0,
             calib_generate_top_p: float = 1.0, on_generate=None, repair: str | None = None,
             quantize: str | None = None, group_size: int | str | None = None, asymmetric: bool = False,
             quant_solver: str | None = None, quant_actorder: str | None = None, quant_observer: str | None = None,
             format: str = "auto", eval_data: str | None = None, eval_rows: int | None = None,
             resume: bool = False, **pass_settings) -> CompressResult:
    """Compress a checkpoint folder and export it to ``out``.

    Either ``method`` (+ ``pattern`` or ``sparsity``) or ``recipe`` (a YAML/JSON file or a list
    of ``{"pass": NAME, ...}``). ``model=None`` compresses the embedded default
    (all-MiniLM-L6-v2). Returns the report (also written to ``json_path``) and, when the model
    is small enough to keep, the compressed model in memory.

    ``calib_generate=K`` (RAC, causal LMs): the dense model first continues every calibration
    sample by K tokens (``calib_generate_mode`` "sample" with ``calib_generate_temperature`` /
    ``calib_generate_top_p``, seeded by ``seed``, or "greedy"), and every pass calibrates on
    prompt + generated tokens; the report's calibration says how many of each.

    ``format``: ``auto`` (default) stores what the passes promise compactly, ``dense`` plain
    weights, ``compressed`` like auto but refuses a recipe with nothing to pack
    (:mod:`squeeze.formats`). The source may itself be a squeeze export, packed or dense: its masks
    stay promised (a quantize pass keeps their zeros) and its passes stay in the record.

    ``eval_data``: held-out data (the forms of ``calib``, or ``auto``: the built-in held-out text
    when the model has a tokenizer) on which the export is scored against the source after it is
    written (``report["quality"]``: ppl beside the source's ppl and KL for LMs, embedding cosine
    for encoders, the activation sparsity reached for run-time methods), on ``eval_rows`` rows
    (default: the first rows up to :data:`squeeze.evaluation.DEFAULT_EVAL_TOKENS` tokens). The
    default None skips it, so the API stays as cheap as the sweep (tests and the bench call it
    often and score on their own data); the CLI passes ``auto``.

    ``resume``: continue a killed run of the same settings from the last block it finished
    (:mod:`squeeze.resume`; the work folder ``.<out name>.compress-work`` next to ``out`` is kept
    after every block and removed on success); the export is byte-identical to an uninterrupted
    run's at the same thread count (a folder instead of True is dReLU recovery's ``resume``
    setting). A run whose model stage needs the whole model in memory
    (dReLU recovery) keeps no work folder: its sweep reruns and the recovery resumes from its own
    checkpoints. A resumed run returns no in-memory model (its first blocks were never loaded).

    ``recipe``: a file, a list of pass entries, or a shipped recipe's name (``best-2:4``: the
    variant for this kind of model, :func:`squeeze.recipe.resolve_recipe`). A recipe with a
    ``recover:`` section is compressed, then recovered toward the source, in this one call.
    """
    t_start = time.perf_counter()
    from squeeze import defaults

    if isinstance(resume, (str, Path)):  # a folder is dReLU recovery's own resume setting, not this flag
        pass_settings["resume"], resume = str(resume), False

    is_default = model is None
    nothing_set = all(v is None or v is False for v in pass_settings.values())  # no pass setting was given
    if is_default:
        model = defaults.default_model_path()
        nsamples = nsamples or defaults.DEFAULT_NSAMPLES
        seqlen = seqlen or defaults.DEFAULT_SEQLEN
        if method is None and recipe is None:  # the best 2:4 that takes about a minute (recipes/quick-2of4.yaml)
            if pattern is None and sparsity is None and nothing_set:
                recipe = None if quantize else defaults.DEFAULT_RECIPE  # --quantize alone: quantization alone
            else:
                method = "sparsegpt"
        if dtype == "auto":  # the fp32 default model in bf16: half the bytes, the same cosines (bench/README.md)
            dtype = "bfloat16"
    ckpt = open_dense(model)
    if out is None:
        raise SqueezeError("no output folder: give --out DIR")
    out = Path(out)
    check_output_dir(out, ckpt.path, overwrite)
    check_format(format)
    ct = format == "compressed-tensors"  # swept as for auto, then rewritten in that layout (squeeze.export_ct)
    export_dtype = parse_dtype(dtype)

    t_code = time.perf_counter()
    config, skeleton = sweep_skeleton(ckpt, trust_remote_code)
    phases = {"model code": time.perf_counter() - t_code}  # importing the architecture's modeling code
    family = "decoder" if model_kind(skeleton) == "causal" else "encoder"  # which shipped recipes fit
    plan = None
    if recipe is not None:
        given = {"method": method, "pattern": pattern, "sparsity": sparsity, **pass_settings}
        stray = sorted(k for k, v in given.items() if v is not None and v is not False)
        if stray:  # a recipe names every pass's settings: silently dropping a flag would mislead
            raise SqueezeError(f"--recipe was given together with {', '.join(stray)}: put those settings in the "
                               "recipe's pass entries instead (e.g. {pass: wanda, sparsity: 0.5, "
                               "sparsity_profile: owl})")
        plan = resolve_recipe(recipe, family)
        nsamples = nsamples or plan.calibration.get("nsamples")
        seqlen = seqlen or plan.calibration.get("seqlen")
        if plan.recover:
            distributed.refuse(f"recipe {plan.name or plan.path} (its recover: section trains on all the data)")
            _check_recover_recipe(plan, quantize, format)
            sweep = dict(calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, packing=packing, targets=targets,
                         ignore=ignore, dtype=dtype, strict=strict, format=format, repair=repair,
                         trust_remote_code=trust_remote_code, on_block=on_block, calib_generate=calib_generate,
                         calib_generate_mode=calib_generate_mode, calib_generate_temperature=calib_generate_temperature,
                         calib_generate_top_p=calib_generate_top_p, on_generate=on_generate)
            return _then_recover(plan, None if is_default else model, out, overwrite, json_path, keep_in_memory,
                                 eval_data, eval_rows, sweep, resume)
        entries = list(plan.passes)
    elif method is None and quantize and pattern is None and sparsity is None and nothing_set:
        entries = []  # quantization alone
    else:
        entries = flags_recipe(method, pattern, sparsity, **pass_settings)
    if repair:  # a mask-repair pass (e.g. dsnot) after the recipe; it follows the last pruning pass's pattern
        entries = entries + [{"pass": repair}]
    if quantize:  # quantization last, on the mask the passes before left (same calibration sweep)
        q = {"pass": "quantize", "bits": quantize, "group_size": group_size, "symmetric": not asymmetric,
             "solver": quant_solver, "actorder": quant_actorder, "observer": quant_observer}
        entries = entries + [{k: v for k, v in q.items() if v is not None}]
    elif group_size is not None or asymmetric or quant_solver or quant_actorder or quant_observer:
        raise SqueezeError("--group-size / --asymmetric / --quant-solver / --quant-actorder / --quant-observer set how "
                           "to quantize: add --quantize int8, int4 or fp8")
    methods = build_passes(entries, defaults={"targets": targets, "ignore": ignore, "strict": strict or None})
    passes = [m for m in methods if isinstance(m, BlockPass)]
    stages = [st for m in methods for st in m.stages()]
    whole_model = any(st.needs_weights for st in stages)  # a model stage works on every block at once
    if whole_model:
        keep_in_memory = True
    if keep_in_memory is None:
        import psutil

        fp32_bytes = sum(p.numel() for p in skeleton.parameters()) * 4
        keep_in_memory = fp32_bytes < 0.25 * psutil.virtual_memory().available
    if is_plain(skeleton) and (stages or keep_in_memory):
        # the caller gets the model back, or a model stage trains it: transformers' own classes
        config, skeleton = sweep_skeleton(ckpt, trust_remote_code, plain=False)
    from squeeze.loading import read_record

    source_record = read_record(ckpt.path)
    _check_source(ckpt, source_record, methods)
    if format == "compressed" and not any(set(p.promise()) & {"pattern", "sparsity", "quant"} for p in passes):
        raise SqueezeError("--format compressed stores sparse and quantized linears compactly, and this recipe "
                           "promises neither: add --pattern, --sparsity or --quantize, or use --format dense")

    from squeeze.evaluation import check_eval_data, resolve_eval_data

    check_eval_data(resolve_eval_data(eval_data, ckpt.path)[0], ckpt.path)
    nsamples = nsamples or 128
    adapter = Adapter(skeleton)
    for m in methods:
        why = m.unsupported(adapter)
        if why:
            raise SqueezeError(why)
    _check_distributed(stages, calib_generate)
    if ct:
        from squeeze.export_ct import check_recipe

        check_recipe(methods, passes, adapter)
    if format == "compressed":
        _check_something_packs(passes, adapter)
    weights = WeightMap(skeleton, ckpt)
    calibration = None
    if any(m.needs_calibration for m in methods):
        t_calib = time.perf_counter()
        calibration = build_calibration(ckpt, config, calib, nsamples, seqlen, seed, packing,
                                        trust_remote_code=trust_remote_code)
        phases["calibration"] = time.perf_counter() - t_calib
        if calib_generate:  # RAC: the dense model continues every prompt (see squeeze.calib.generate)
            from squeeze.calib.generate import check_settings, generate_calibration
            from squeeze.loading import load

            check_settings(calib_generate, calib_generate_mode, calib_generate_temperature, calib_generate_top_p)
            dense = load(ckpt.path, dtype=torch.float32, trust_remote_code=trust_remote_code)
            generate_calibration(dense, calibration, calib_generate, calib_generate_mode,
                                 calib_generate_temperature, calib_generate_top_p, on_generate)
            del dense  # the whole dense model lives for this step only; the sweep streams blocks

    from squeeze.calib.runner import BlockRunner, RunResult
    from squeeze.memory import memory_bound

    bound = None
    if passes and not keep_in_memory:  # streamed: what the peak should stay under, beside the peak
        import psutil

        bound = memory_bound(adapter, weights, calibration, psutil.Process().memory_info().rss, passes)

    writer = distributed.is_writer()  # distributed: only rank 0 stages and writes the export
    state = saved = None
    if resume and distributed.active():
        distributed.refuse("--resume (each rank would need its own work folder)")
    if passes and not whole_model and not distributed.active():  # the sweep survives a kill (squeeze.resume)
        from squeeze.resume import SweepState, work_dir
        from squeeze.train.state import fingerprint

        ident = _identity(ckpt, methods, calibration, seed, export_dtype, format)
        state = SweepState(work_dir(out), fingerprint(ident))
        saved = state.start(resume, out)
    if saved is not None:
        keep_in_memory = False  # the blocks the killed run finished are not loaded again

    with staging_dir(out) if writer else contextlib.nullcontext() as tmp, _work_kept_when_interrupted(state):
        spill = (Spill(state.spill_dir if state else tmp / ".spill", weights, export_dtype, "auto" if ct else format)
                 if writer else None)
        if saved is not None:
            spill.restore(saved["done"])
        result = RunResult()
        if passes:
            runner = BlockRunner(skeleton, adapter, weights, passes, calibration, keep=keep_in_memory, spill=spill,
                                 on_block=on_block, promised=_promises(source_record), state=state, saved=saved)
            result = runner.run()
        elif keep_in_memory:  # nothing to sweep: the kept model is the source's weights
            weights.materialize(skeleton, "", torch.float32)
        stage_ctx = ModelContext(skeleton, adapter, ckpt, calibration, torch.float32, {})
        for st in stages:
            st.run(stage_ctx)
        if whole_model:  # the stages changed weights the sweep already spilled: hand the new ones over
            for i in range(len(adapter)):
                spill(adapter.block(i))
        # distributed: every rank's sweep succeeded before rank 0 writes (a failure elsewhere is
        # raised here, inside the staging folder, so nothing reaches --out)
        distributed.agree()
        report = {
            "model": str(ckpt.path) if not is_default else f"{defaults.DEFAULT_NAME} ({ckpt.path})",
            "model_path": str(ckpt.path),  # "model" is for display; this is the folder itself
            "out": str(out.resolve()),
            "adapter": adapter.describe(),
            "passes": [m.describe() for m in methods],
            **({"recipe": plan.describe()} if plan and (plan.name or plan.path) else {}),
            "calibration": calibration.describe() if calibration else None,
            "linears": result.linears,
            "summary": _summary(result.linears),
            "forwards_per_block": result.forwards_per_block,
            **({"resumed_from_block": saved["done"] + 1} if saved is not None else {}),
        }
        if not writer:  # the sweep is done and agreed; rank 0 writes, scores and reports
            return CompressResult(out, {**report, "rank": distributed.rank()})
        if distributed.active():  # in the report, not the record: the export is the same either way
            report["distributed"] = distributed.describe()
        record = {k: report[k] for k in ("passes", "calibration", "linears", "summary", "adapter")}
        # a squeeze export as the source: what was done before stays recorded (and promised)
        record["passes"] = list(source_record.get("passes") or []) + record["passes"]
        record["linears"] = {**(source_record.get("linears") or {}), **record["linears"]}
        record["source"] = {"path": str(ckpt.path), "model_type": config.model_type}
        record["seed"] = seed  # with made_with's threads: what reproduces these bytes
        # transformers 5 reads "dtype"; older versions "torch_dtype": keep both in step
        updates = {k: str(export_dtype).removeprefix("torch.") for k in ("dtype", "torch_dtype")} \
            if export_dtype else {}
        dest = tmp / ".compact" if ct else tmp  # compressed-tensors: converted from the compact export
        dest.mkdir(exist_ok=True)
        t_write = time.perf_counter()
        sizes = write_checkpoint(ckpt, dest, spill, updates, record)
        if format == "compressed" and not record.get("format"):  # before commit: nothing reaches --out
            raise SqueezeError("--format compressed: no linear came out sparse or quantized enough to store more "
                               "compactly than dense; prune harder (--pattern / --sparsity), quantize, or use "
                               "--format dense")
        if ct:
            from squeeze.checkpoint import Checkpoint
            from squeeze.export_ct import write as write_ct

            sizes, record = write_ct(Checkpoint(dest), tmp)
        import shutil

        for scratch in (tmp / ".spill", tmp / ".compact"):
            shutil.rmtree(scratch, ignore_errors=True)
        commit(tmp, out)
        write_s = time.perf_counter() - t_write
    if state is not None:
        state.remove()
    report["files"] = sizes
    report.update(size_report(ckpt, sizes, record))
    if ct:
        from squeeze.export_ct import report_format

        report["format"] = report_format(record)
    elif format != "dense" and spill.packed:
        report["format"] = {"kind": kind_of(spill.packed), "packed_linears": len(spill.packed),
                            "stored_dense": sorted(n for n in result.linears
                                                   if weights.to_ckpt.get(f"{n}.weight") not in spill.packed)}
    report["seconds"] = round(time.perf_counter() - t_start, 3)
    # where the time went: the sweep's phases summed over the blocks, and the steps around it
    report["seconds_by_phase"] = {k: round(v, 3) for k, v in {**phases, **result.seconds, "write": write_s}.items()}
    nxt = next_step(plan.name if plan else None, family)
    if nxt:
        where = "" if is_default else f" {ckpt.path}"
        data = "" if calib == "builtin" else f" --calib {calib}"
        report["next"] = {**nxt, "command": f"squeeze compress{where} --recipe {nxt['recipe']} --out OUT{data}"}
    for m in [*methods, *stages]:
        report.setdefault("pass_reports", {}).update(m.report or {})
    report["done"] = [_chosen(m, stages) for m in methods]
    report["quality"] = _quality(out, ckpt.path, eval_data, eval_rows, methods, calibration)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)  # after scoring: the command's peak, quality included
    if bound:
        report["memory_bound"] = bound
    if json_path:
        write_json(json_path, report)
    return CompressResult(out, report, as_loaded(skeleton) if keep_in_memory else None)


def _identity(ckpt, methods, calibration, seed: int, export_dtype, format: str) -> dict:
    """What makes two compress runs the same run, so a resume continues only its own: the source's
    files, every pass's settings, the calibration tokens, the seed, dtype, format, thread count and
    library versions (each changes the bytes)."""
    from squeeze.resume import source_files
    from squeeze.versions import made_with

    return {"source": str(Path(ckpt.path).resolve()), "files": source_files(ckpt),
            "passes": [m.describe() for m in methods], "calibration": calibration.describe() if calibration else None,
            "seed": seed, "dtype": str(export_dtype), "format": format, **made_with()}


@contextlib.contextmanager
def _work_kept_when_interrupted(state):
    """A mistake found mid-sweep (non-finite activations, a bad setting) would recur on resume:
    its work folder goes. An interrupt or a crash of the process keeps it for ``--resume``."""
    from squeeze.export import out_of_space

    try:
        yield
    except SqueezeError:
        if state is not None:
            state.remove()
        raise
    except Exception as e:
        if state is not None and out_of_space(e):  # the work folder fills the same disk: free it too
            state.remove()
        raise
    except KeyboardInterrupt as e:
        if state is not None and state.read() is not None:
            e.resumable = state.folder  # the CLI says how to continue
        elif state is not None:  # stopped before the first block was finished: nothing to continue
            state.remove()
        raise


def _check_distributed(stages, calib_generate: int) -> None:
    """Under several processes, refuse what is not distributed rather than compute it differently."""
    if not distributed.active():
        return
    if calib_generate:
        distributed.refuse("--calib-generate (RAC generates from every calibration sample in one model)")
    for st in stages:
        if st.needs_weights or st.needs_calibration:
            distributed.refuse(f"{st.name}'s model stage (it works on the whole model and all the data)")


def _check_something_packs(passes, adapter: Adapter) -> None:
    """``--format compressed`` with N:M passes only, none of which can prune a single group (every
    linear it targets is narrower than M along both axes, so each is kept whole and dense): known from
    the shapes before any work, so say it now. Other cases are caught when the export is assembled."""
    nm = [p for p in passes if set(p.promise()) == {"pattern"}]
    if not nm or len(nm) != len(passes):
        return
    for p in nm:
        m = int(p.promise()["pattern"].split(":")[1])
        for i in range(len(adapter)):
            if any(max(lin.in_features, lin.out_features) >= m for lin in p.targets(adapter.block(i))):
                return
    widest = max((max(lin.in_features, lin.out_features) for i in range(len(adapter)) for p in nm
                  for lin in p.targets(adapter.block(i))), default=0)
    raise SqueezeError(f"--format compressed: no targeted linear fits pattern {nm[0].promise()['pattern']} (the widest "
                       f"targeted linear is {widest} wide, less than one group), so nothing would be stored compactly; "
                       "choose a smaller M, other --targets, or --format dense")


def _check_recover_recipe(plan: Recipe, quantize, format: str) -> None:
    if quantize or any(e.get("pass") == "quantize" for e in plan.passes):
        raise SqueezeError(f"recipe {plan.name or plan.path} recovers after its passes, and training would move "
                           "quantized weights off their grid: compress with the recipe first, then quantize the result "
                           "(squeeze compress OUT --out OUT_Q --quantize int8)")
    if format == "compressed-tensors":
        raise SqueezeError(f"recipe {plan.name or plan.path} ends with recovery, which writes squeeze's layouts: use "
                           "--format auto, then `squeeze convert OUT --out OUT_CT`")


def _then_recover(plan: Recipe, model, out: Path, overwrite: bool, json_path, keep_in_memory, eval_data, eval_rows,
                  kw: dict, resume: bool = False):
    """A recipe with a ``recover:`` section: its passes export a one-shot model to a work folder
    next to ``out``, :func:`squeeze.recovery.recover` distils that toward the source (masks kept)
    into ``out``, and the work folder goes. One report: the sweep's, with the recovery's beside it,
    the final export's bytes and its quality (the one-shot model's beside it, on the same rows).
    ``resume`` continues the sweep's work folder; the recovery reruns."""
    import shutil

    from squeeze.recovery import recover, work_dir
    from squeeze.resume import work_dir as sweep_work_dir

    t_start = time.perf_counter()
    oneshot = out.parent / f".{out.name}.oneshot-work"
    shutil.rmtree(oneshot, ignore_errors=True)
    if not resume:  # the one-shot sweep is this call's own: a killed earlier one is not asked about
        shutil.rmtree(sweep_work_dir(oneshot), ignore_errors=True)
    try:
        first = compress(model, oneshot, recipe=Recipe(plan.passes, calibration=plan.calibration), overwrite=True,
                         keep_in_memory=False, resume=resume, **kw)
        cal = first.report["calibration"] or {}
        settings = dict(plan.recover)
        if settings.get("rows", "packed") == "packed":  # the sweep's calibration rows, unless the recipe says
            settings = {"nsamples": cal.get("nsamples"), "seqlen": cal.get("seqlen"), **settings}
        settings = {"calib": kw["calib"], "seed": kw["seed"], "packing": kw["packing"], **settings}
        # no checkpoints: the one-shot folder they would resume from does not outlive this call
        rec = recover(oneshot, out, reference=first.report["model_path"], overwrite=overwrite,
                      trust_remote_code=kw["trust_remote_code"], keep_model=keep_in_memory is not False,
                      checkpoint_every=10 ** 9, eval_data=eval_data, eval_rows=eval_rows, **settings)
    finally:
        shutil.rmtree(oneshot, ignore_errors=True)
        shutil.rmtree(work_dir(out), ignore_errors=True)
    report = dict(first.report)
    r = rec.report
    report["out"] = r["out"]
    report["recipe"] = plan.describe()
    report["recover"] = {k: r[k] for k in ("loss", "steps", "lr", "batch_size", "calibration", "loss_before",
                                           "loss_after", "lr_schedule", "warmup", "augment", "seconds") if k in r}
    if "quality_after" in r:
        report["quality"] = r["quality_after"]
        report["recover"]["quality_before"] = r["quality_before"]
    recovered = {"pass": "recover", **{k: r[k] for k in ("steps", "lr", "batch_size", "loss")}}
    report["passes"] = list(report["passes"]) + [recovered]
    report["done"] = list(report.get("done") or []) + [{
        "pass": "recover", "settings": {k: v for k, v in recovered.items() if k != "pass"},
        "results": {"train loss": f"{r['loss_before']:.4g} -> {r['loss_after']:.4g}"}}]
    for k in ("files", "size_bytes", "loads_with"):
        report[k] = r[k]
    report["seconds"] = round(time.perf_counter() - t_start, 3)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if json_path:
        write_json(json_path, report)
    return CompressResult(Path(r["out"]), report, rec.model)


def _chosen(method, stages) -> dict:
    """The report's "what was done" for one method, the outcomes of the model stages it ran
    included (e.g. dReLU's recovery: KL and zero fraction before / after)."""
    entry = method.chosen()
    for st in stages:
        if st is not method and st.name == method.name and st.results():
            entry["results"] = {**entry.get("results", {}), **st.results()}
    return entry


def _quality(out: Path, source: Path, eval_data, eval_rows, methods, calibration) -> dict:
    """The export against its source on held-out data (:func:`squeeze.evaluation.quality`). When
    quality was asked for but there is no held-out data to use (``auto`` and no tokenizer), an
    export with run-time activation sparsity is still measured on its calibration rows for the
    activation sparsity it reaches (what those passes chose)."""
    from squeeze.evaluation import act_sparsity_on, quality, resolve_eval_data

    data, why = resolve_eval_data(eval_data, source)
    q = quality(out, source, data, eval_rows, skipped=why)
    asked = eval_data is not None and str(eval_data).lower() != "none"  # the API's default stays free
    if asked and not q["measured"] and calibration is not None and any("runtime" in m.describe() for m in methods):
        rows = list(calibration.samples)[:eval_rows or 16]
        sp = act_sparsity_on(out, rows)
        if sp:
            q["act_sparsity"] = {**sp, "measured_on": f"{len(rows)} calibration rows"}
    return q


def _check_source(ckpt, record: dict, methods) -> None:
    """Refuse sources a sweep would read wrong: run-time state it would drop, or quantizing twice."""
    from squeeze.runtime.spec import needs_runtime

    runtime = [e["pass"] for e in record.get("passes") or [] if needs_runtime(e.get("pass"))]
    if runtime:
        raise SqueezeError(f"{ckpt.path} is a squeeze export with run-time state ({', '.join(runtime)}), which a "
                           "new sweep would not carry over: compress its source instead, with every pass in one "
                           "recipe (--recipe)")
    done = [e for e in record.get("passes") or [] if e.get("pass") == "quantize"]
    if done and any(m.name == "quantize" for m in methods):
        raise SqueezeError(f"{ckpt.path} is already quantized ({done[0].get('quant')}): quantize its unquantized "
                           "source instead")


# per-linear fields of a record that were measured, not promised
_MEASURED = ("role", "shape", "pattern_ok", "dense_tail_columns", "dense_tail_rows", "measured_sparsity")


def _promises(record: dict) -> dict[str, dict]:
    """{linear name: what the source export promised it} (masks a later pass must keep)."""
    return {name: {k: v for k, v in rec.items() if k not in _MEASURED}
            for name, rec in (record.get("linears") or {}).items() if rec.get("pass")}


def _summary(linears: dict) -> dict:
    if not linears:
        return {"targeted_linears": 0}
    total = sum(r["shape"][0] * r["shape"][1] for r in linears.values())
    zeros = sum(r.get("measured_sparsity", r["sparsity"]) * r["shape"][0] * r["shape"][1] for r in linears.values())
    out = {"targeted_linears": len(linears), "targeted_params": total, "sparsity": round(zeros / total, 6)}
    checked = [r for r in linears.values() if "pattern_ok" in r]  # N:M linears only
    if checked:
        out["pattern_ok"] = all(r["pattern_ok"] for r in checked)
        out["pattern_linears"] = len(checked)
    free = [r for r in linears.values() if "pattern" not in r and isinstance(r.get("sparsity"), (int, float))
            and "measured_sparsity" in r]
    if free:  # unstructured: what was asked (per layer with OWL) beside the zeros really in the weights
        size = [r["shape"][0] * r["shape"][1] for r in free]
        target = sum(float(r.get("sparsity_target", r["sparsity"])) * n for r, n in zip(free, size)) / sum(size)
        achieved = sum(r["measured_sparsity"] * n for r, n in zip(free, size)) / sum(size)
        out["unstructured"] = {"linears": len(free), "target": round(target, 6), "achieved": round(achieved, 6)}
    return out
