"""Shared pass for calibrated activation sparsity (TEAL, WINA): observe each site's input during
the statistics forward, pick per-site thresholds for the target sparsity (uniform or TEAL's
greedy allocation), install :mod:`squeeze.runtime.act_sparse` sparsifiers.

Greedy allocation needs the block output as a function of per-site sparsities; the runner only
shows a pass its block through hooks, so the pass records the block's call arguments for the
first calibration batch (a forward pre-hook on every block, registered in ``setup`` and
removed in ``finish``), keeps a bounded number of its sequences, and re-runs the block on them.
"""

from __future__ import annotations

import dataclasses

import torch

from squeeze.adapters import Adapter, Block, Linear
from squeeze.errors import SqueezeError
from squeeze.passes._actsparse_math import (
    ROTATED_SITES,
    SITES,
    column_norms,
    greedy_allocation,
    orthogonal_transform,
    sample_rows,
    scores,
    threshold_for,
    weighted_sparsity,
)
from squeeze.passes.base import Pass
from squeeze.runtime.act_sparse import ActSparsifier, block_sites, install, uninstall


def _parse_sites(value: str) -> tuple:
    sites = tuple(s.strip() for s in str(value).split(",") if s.strip())
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise SqueezeError(f"bad sites {value!r}: use a comma list of {', '.join(SITES)}")
    return sites


def _slice_batch(obj, batch: int, keep: int):
    """Keep the first ``keep`` sequences of every tensor whose leading dim is the batch."""
    if isinstance(obj, torch.Tensor):
        return obj[:keep] if obj.dim() and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_slice_batch(o, batch, keep) for o in obj)
    if isinstance(obj, list):
        return [_slice_batch(o, batch, keep) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice_batch(v, batch, keep) for k, v in obj.items()}
    return obj


class ActSparsityPass(Pass):
    weighted = False  # WINA weighs |x| by the consuming weight's column norms
    fresh_statistics = True  # always observe the block as changed by passes before (prune, then sparsify)

    @dataclasses.dataclass
    class Settings(Pass.Settings):
        act_sparsity: float = 0.5  # model-wide target: fraction of site inputs zeroed (weighted by weight size)
        allocation: str = "uniform"  # uniform | greedy
        mode: str = "threshold"  # threshold (calibrated) | topk (per token)
        sites: str = ",".join(SITES)
        dense_prefix: float = 0.01  # fraction of prefill positions kept dense
        sample_tokens: int = 4096  # calibration tokens kept per site and block (threshold samples)
        greedy_step: float = 0.05
        greedy_tokens: int = 2048  # tokens of block input re-run per greedy trial
        transform: bool = False  # WINA only: rotate the shared q/k/v and gate/up inputs (orthogonal columns)
        seed: int = 0

    def validate(self) -> None:
        s = self.settings
        try:
            s.act_sparsity = float(s.act_sparsity)
        except (TypeError, ValueError):
            raise SqueezeError(f"{self.name}: --act-sparsity must be a number in [0, 1)") from None
        if not 0.0 <= s.act_sparsity < 1.0:
            raise SqueezeError(f"{self.name}: --act-sparsity {s.act_sparsity} must be in [0, 1), e.g. 0.5")
        if s.allocation not in ("uniform", "greedy"):
            raise SqueezeError(f"{self.name}: --allocation must be uniform or greedy, not {s.allocation!r}")
        if s.mode not in ("threshold", "topk"):
            raise SqueezeError(f"{self.name}: mode must be threshold or topk, not {s.mode!r}")
        if not 0.0 <= float(s.dense_prefix) < 1.0:
            raise SqueezeError(f"{self.name}: dense_prefix must be in [0, 1)")
        if not 0.0 < float(s.greedy_step) <= 0.5:
            raise SqueezeError(f"{self.name}: greedy_step must be in (0, 0.5]")
        self.site_names = _parse_sites(s.sites)
        if not isinstance(s.transform, bool):
            raise SqueezeError(f"{self.name}: transform must be true or false, not {s.transform!r}")
        if s.transform and not self.weighted:
            raise SqueezeError(f"{self.name}: transform is WINA's orthogonal transform; use --method wina")

    # -- setup: record block call arguments for greedy -----------------------------------------
    def setup(self, run) -> None:
        super().setup(run)
        self.report = {}
        self._samples: dict[str, list[torch.Tensor]] = {}
        self._decisions: dict[str, tuple] | None = None
        self._rotations: dict[str, torch.Tensor] = {}
        self._capture_for: int | None = None
        self._captured = None
        self._gen = torch.Generator().manual_seed(self.settings.seed)
        self._handles = []
        if self.settings.act_sparsity > 0:
            for i, blk in enumerate(run.adapter.blocks):
                self._handles.append(blk.register_forward_pre_hook(
                    lambda m, args, kwargs, i=i: self._record_call(i, args, kwargs), with_kwargs=True))

    def _record_call(self, index, args, kwargs):
        if self._capture_for != index or self._captured is not None:
            return
        hidden, rest = args[0], tuple(args[1:])
        if hidden is None or hidden.dim() != 3:
            return
        b, t = hidden.shape[:2]
        want = max(self.settings.greedy_tokens, self.settings.sample_tokens)
        keep = max(1, min(b, -(-want // max(t, 1))))
        self._captured = (hidden[:keep].detach().clone(), _slice_batch(rest, b, keep),
                          _slice_batch(dict(kwargs), b, keep))
        return

    def finish(self, run) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- sites ---------------------------------------------------------------------------------
    def _sites(self, block: Block) -> dict:
        sites = block_sites(block.linears, self.site_names)
        allowed = {lin.name for lin in super().targets(block)}
        return {s: (h, [c for c in cs if c.name in allowed]) for s, (h, cs) in sites.items()
                if any(c.name in allowed for c in cs)}

    def targets(self, block: Block) -> list[Linear]:
        return [c for _, cs in self._sites(block).values() for c in cs]

    def observed(self, block: Block) -> list[Linear]:
        self._capture_for = block.index
        return [h for h, _ in self._sites(block).values()]

    def observe(self, block, linear, x, y):
        if self._captured is not None:  # thresholds will come from the captured call
            return
        rows = max(1, self.settings.sample_tokens)
        self._samples.setdefault(linear.name, []).append(sample_rows(x, rows, self._gen).cpu())

    # -- decide --------------------------------------------------------------------------------
    def _scale(self, host: Linear) -> torch.Tensor | None:
        return column_norms(host.weight) if self.weighted else None

    def _rotate(self, sites: dict) -> dict:
        """WINA's orthogonal transform for this block's shared-input sites: rotate every consumer
        W -> W V in place and return {site: (V, singular values)}; see
        :func:`squeeze.passes._actsparse_math.orthogonal_transform`."""
        out = {}
        for site in ROTATED_SITES:
            if site not in sites:
                continue
            consumers = sites[site][1]
            zeros = sum(int((c.weight == 0).sum()) for c in consumers) / sum(c.weight.numel() for c in consumers)
            if zeros > 0.01:
                raise SqueezeError(
                    f"{self.name}: transform rotates the weights of {', '.join(c.name for c in consumers)}, "
                    f"which are {zeros:.0%} zeros (pruned?): the rotation would make them dense again. "
                    "Use wina without transform after weight pruning.")
            rotated, v, sv = orthogonal_transform([c.weight for c in consumers])
            for c, w in zip(consumers, rotated):
                c.set_weight(w)
            out[site] = (v, sv)
        return out

    def _block_decisions(self, block: Block) -> dict:
        s = self.settings
        sites = self._sites(block)
        rotated = self._rotate(sites) if s.transform else {}
        self._rotations = {site: v for site, (v, _) in rotated.items()}
        scales = {site: self._scale(host) for site, (host, _) in sites.items()}
        # a rotated site's (stacked) columns are orthogonal: their norms are the singular values
        scales.update({site: sv for site, (_, sv) in rotated.items()})

        def sorted_scores(site):  # only for the fallback (no captured block call)
            host = sites[site][0]
            x = torch.cat(self._samples.get(host.name, []) or [torch.zeros(0, host.in_features)])
            x = sample_rows(x, s.sample_tokens, self._gen)
            if site in self._rotations:
                x = x.float() @ self._rotations[site]
            return scores(x, scales[site]).flatten().sort().values
        sizes = {site: sum(c.weight.numel() for c in cs) for site, (_, cs) in sites.items()}
        if s.allocation == "greedy" and self._captured is not None and len(sites) > 1:
            alloc = self._greedy(block, sites, sizes, scales)
        else:
            alloc = {site: s.act_sparsity for site in sites}
        if self._captured is not None and s.mode == "threshold":
            # Thresholds from one forward of the captured tokens with every site sparse, each site
            # calibrated on its input as it arrives (downstream of the sites before it).
            thresholds = self._calibrated(block, sites, scales, alloc)
        else:  # fallback: quantiles of the inputs seen in the (dense-site) statistics forward
            thresholds = {site: threshold_for(sorted_scores(site), alloc[site]) for site in sites}
        out = {}
        for site in sites:
            out[site] = (alloc[site], thresholds[site], scales[site])
        self.report.setdefault(self.name, {})[str(block.index)] = {
            site: {"sparsity": round(sp, 4), "threshold": round(t, 6)} for site, (sp, t, _) in out.items()}
        self.report[self.name][str(block.index)]["weighted"] = round(
            weighted_sparsity({k: v[0] for k, v in out.items()}, sizes), 4)
        return out

    def _make(self, site: str, host: Linear, sparsity: float, threshold: float, scale) -> ActSparsifier:
        rotation = self._rotations.get(site)
        sp = ActSparsifier(host.in_features, self.settings.mode, self.weighted, self.settings.dense_prefix,
                           rotated=rotation is not None)
        if scale is not None:
            sp.scale.copy_(scale)
        if rotation is not None:
            sp.rotation.copy_(rotation)
        sp.set(sparsity, threshold)
        return sp.to(host.module.weight.device)

    def _run_captured(self, block, tokens: int | None = None):
        from squeeze.calib.runner import _outputs

        hidden, rest, kwargs = self._captured
        b, t = hidden.shape[:2]
        keep = b if tokens is None else max(1, min(b, -(-tokens // max(t, 1))))
        hidden = hidden[:keep].to(next(block.module.parameters()).dtype)
        return _outputs(block.module(hidden, *_slice_batch(rest, b, keep), **_slice_batch(kwargs, b, keep)))

    @torch.no_grad()
    def _calibrated(self, block, sites, scales, alloc) -> dict:
        sps = {site: self._make(site, h, 0.0, 0.0, scales[site]) for site, (h, _) in sites.items()}
        for site, (h, cs) in sites.items():
            install(h, cs, sps[site])
            sps[site].calibrate_to = alloc[site]
        try:
            self._run_captured(block)
            return {site: float(sp.threshold) for site, sp in sps.items()}
        finally:
            for _, cs in sites.values():
                uninstall(cs)

    @torch.no_grad()
    def _greedy(self, block, sites, sizes, scales) -> dict:
        n = self.settings.greedy_tokens
        sps = {site: self._make(site, h, 0.0, 0.0, scales[site]) for site, (h, _) in sites.items()}
        for site, (h, cs) in sites.items():
            install(h, cs, sps[site])
        try:
            # the reference output with every site at 0%: the dense block (its rotated sites
            # need their sparsifiers installed to rotate their inputs back into the weights' basis)
            dense = self._run_captured(block, n).float()
            norm = dense.pow(2).mean().clamp_min(1e-12)

            def error_of(alloc):
                for site, sp in alloc.items():
                    sps[site].calibrate_to = sp  # each trial's thresholds calibrated in order
                out = self._run_captured(block, n).float()
                return float((out - dense).pow(2).mean() / norm)

            return greedy_allocation(sizes, self.settings.act_sparsity, error_of, self.settings.greedy_step)
        finally:
            for _, cs in sites.values():
                uninstall(cs)

    def decide(self, block: Block, linear: Linear):
        if self._decisions is None:
            self._decisions = self._block_decisions(block)
        return self._decisions

    def apply(self, block: Block, linear: Linear, decisions) -> None:
        sites = self._sites(block)
        for site, (host, consumers) in sites.items():
            if any(c.name == linear.name for c in consumers) and "act_sparse" not in host.module._modules:
                install(host, consumers, self._make(site, host, *decisions[site]))

    def end_block(self, block: Block) -> None:
        self._samples.clear()
        self._decisions = None
        self._captured = None
        self._capture_for = None
        self._rotations = {}

    # -- export / load -------------------------------------------------------------------------
    def describe(self) -> dict:
        d = super().describe()
        d["weighted"] = self.weighted
        if self.settings.transform:
            d["runtime"] = ("squeeze.runtime.act_sparse (squeeze.load applies it). The q/k/v and gate/up weights "
                            "are stored ROTATED (WINA transform): plain from_pretrained of this export is WRONG; "
                            "use squeeze.load, which rotates their inputs to match")
        else:
            d["runtime"] = "squeeze.runtime.act_sparse (squeeze.load applies it; plain from_pretrained is dense)"
        return d

    @classmethod
    def on_load(cls, model, entry: dict, path, record: dict) -> None:
        """Re-install empty sparsifiers on every site the pass touched; their buffers (threshold,
        sparsity, WINA scale) then load from the sidecar by name."""
        sites_wanted = _parse_sites(entry.get("sites", ",".join(SITES)))
        mode = entry.get("mode", "threshold")
        prefix = float(entry.get("dense_prefix", 0.01))
        rotated_sites = ROTATED_SITES if entry.get("transform") else ()
        adapter = Adapter(model)
        import re

        t, ig = entry.get("targets"), entry.get("ignore")
        for i in range(len(adapter)):
            block = adapter.block(i)
            for site, (host, consumers) in block_sites(block.linears, sites_wanted).items():
                consumers = [c for c in consumers if (not t or re.search(t, c.name)) and not (ig and re.search(ig, c.name))]
                if not consumers:
                    continue
                sp = ActSparsifier(host.in_features, mode, cls.weighted, prefix, rotated=site in rotated_sites)
                sp = sp.to(host.module.weight.device)
                install(host, consumers, sp)
