"""Weight-only quantization as a block pass: int8 / int4 (group-wise scales, symmetric or
asymmetric) or fp8 e4m3, by round-to-nearest or by GPTQ's OBS error compensation (Frantar et al.
2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"), on
SparseGPT's Hessian machinery (:func:`squeeze.algorithms.sparsegpt.obs_quantize`). By default OBS
sweeps the columns in GPTQ's act-order (``actorder: static``, llm-compressor's default too) and
symmetric scales come from the mse clipping search (``observer``, :func:`default_observer`).

It composes with any pruning pass before it in the recipe, in the same calibration sweep: the
mask that pass promised stays exact zeros (pruned entries get the code that decodes to 0, and OBS
never refills them), and the Hessian is taken from the block as the passes before changed it.

The quantized weight stays in the model dequantized (so the in-memory model computes what the
export holds); its scales ride on the linear as non-persistent buffers until the export packs
codes + scales (:mod:`squeeze.formats`).
"""

from __future__ import annotations

import dataclasses

from squeeze.algorithms.quant import OBSERVERS, QuantSpec, rtn
from squeeze.algorithms.sparsegpt import obs_quantize
from squeeze.calib.stats import hessian_for
from squeeze.errors import SqueezeError
from squeeze.formats import attach_quant, quant_of
from squeeze.passes.base import BlockContext, BlockPass, register

DEFAULT_GROUP = {"int4": 128}  # int8 and fp8: one scale per output row unless asked


def default_observer(spec: QuantSpec, solver: str) -> str:
    """The observer a quantize pass uses unless told: ``mse`` for symmetric OBS (int4, int8, fp8) and
    for symmetric int4 RTN; ``minmax`` for asymmetric int and for int8 / fp8 RTN. Chosen on
    stories260k by KL on calibration rows held out from calibration, summed over both halves of the
    calibration file (bench/README.md §2b, cases ``quant/options*``; OBS with act-order): mse / minmax
    was 0.91x (int4 per-channel OBS), 0.89x (int4 g32 OBS), 0.88x (int8 OBS), 0.94x (fp8 OBS), 0.72x /
    0.61x (int4 per-channel / g32 RTN), but 1.22x for int8 RTN and 1.01x for fp8 RTN (without error
    compensation a clipped outlier's error stays) and 1.12x for asymmetric int4 g32 OBS."""
    if not spec.symmetric:
        return "minmax"
    if solver == "obs" or (spec.format == "int" and spec.bits == 4):
        return "mse"
    return "minmax"


@register
class Quantize(BlockPass):
    name = "quantize"
    hessians = True
    flag = "--quantize"  # with its --group-size / --quant-* flags, alone or after a --method
    fresh_statistics = True  # the Hessian of the block as the passes before left it
    examples = (
        {"bits": "int8"},
        {"bits": "int4", "group_size": 32},
        {"bits": "int4", "group_size": 24, "symmetric": False, "solver": "rtn"},
        {"bits": "fp8", "solver": "rtn"},
        [{"pass": "wanda", "pattern": "2:4"}, {"pass": "quantize", "bits": "int4", "group_size": 32}],
        [{"pass": "sparsegpt", "sparsity": 0.5}, {"pass": "quantize", "bits": "int8"}],
    )

    @dataclasses.dataclass
    class Settings(BlockPass.Settings):
        bits: str = "int8"  # int8 | int4 | fp8
        group_size: int | str | None = None  # input columns per scale, or "channel" (one per output row);
        # default 128 for int4, "channel" for int8 and fp8
        symmetric: bool = True
        solver: str = "obs"  # obs (GPTQ error compensation, needs calibration) | rtn (round to nearest)
        blocksize: int = 128
        dampening: float = 0.01
        actorder: str | None = None  # obs only: static (columns by decreasing H_jj; the default) | none
        observer: str | None = None  # minmax (whole range) | mse (clipping search); default: default_observer

    def validate(self) -> None:
        s = self.settings
        if s.solver not in ("obs", "rtn"):
            raise SqueezeError(f"quantize: unknown solver {s.solver!r}: use obs (GPTQ) or rtn (round to nearest)")
        if s.actorder not in (None, "static", "none"):
            raise SqueezeError(f"quantize: unknown actorder {s.actorder!r}: use static (columns by decreasing "
                               "calibrated input energy) or none (left to right)")
        if s.actorder is not None and s.solver != "obs":
            raise SqueezeError(f"quantize: actorder is the order of the OBS sweep; solver {s.solver} has none "
                               "(drop actorder, or use solver obs)")
        if s.observer is not None and s.observer not in OBSERVERS:
            raise SqueezeError(f"quantize: unknown observer {s.observer!r}: use {' or '.join(OBSERVERS)}")
        if not isinstance(s.blocksize, int) or s.blocksize < 1:
            raise SqueezeError(f"quantize: bad blocksize {s.blocksize!r}: expected a whole number >= 1, e.g. 128")
        group = s.group_size if s.group_size is not None else DEFAULT_GROUP.get(str(s.bits).strip().lower())
        group = None if group == "channel" else group
        self.spec = QuantSpec.parse(s.bits, symmetric=s.symmetric, group_size=group)
        self.needs_calibration = s.solver == "obs"
        # the defaults, resolved here so that squeeze.json records what ran
        if s.solver == "obs" and s.actorder is None:
            s.actorder = "static"
        if s.observer is None:
            s.observer = default_observer(self.spec, s.solver)

    def observed(self, block):
        return self.targets(block) if self.settings.solver == "obs" else []

    def observe(self, ctx: BlockContext, linear, x, y) -> None:
        hessian_for(ctx.scratch(self), linear.name, x).update(x)

    def decide(self, ctx: BlockContext) -> dict:
        out = {}
        for lin in self.targets(ctx.block):
            if quant_of(lin.module) is not None:
                raise SqueezeError(f"quantize: {lin.name} is already quantized; quantize once (one quantize pass, "
                                   "from an unquantized model)")
            w = lin.weight.float()
            masked = {"pattern", "sparsity"} & set(ctx.promises.get(lin.name, {}))
            keep = (w != 0) if masked else None  # a mask promised before: keep it exact
            if self.settings.solver == "obs":
                hessian = ctx.scratch(self).pop(lin.name).matrix()  # the sums go once it is made
                w_hat, scale, zero = obs_quantize(w, hessian, self.spec, keep=keep,
                                                  blocksize=self.settings.blocksize,
                                                  dampening=self.settings.dampening,
                                                  actorder=self.settings.actorder == "static",
                                                  observer=self.settings.observer)
            else:
                w_hat, _, scale, zero = rtn(w, self.spec, keep=keep, observer=self.settings.observer)
            out[lin.name] = (w_hat, scale, zero)
        return out

    def apply(self, ctx: BlockContext, decision: dict) -> None:
        for name, (w_hat, scale, zero) in decision.items():
            lin = ctx.block.linears[name]
            lin.set_weight(w_hat)
            attach_quant(lin.module, self.spec, scale, zero)

    def promise(self) -> dict:
        return {"quant": self.spec.name}

    def describe(self) -> dict:
        return {**super().describe(), "quant": self.spec.name}
