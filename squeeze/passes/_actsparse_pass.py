"""Shared pass for calibrated activation sparsity (TEAL, WINA): pick per-site thresholds for the
target sparsity (uniform, or TEAL's greedy block-wise allocation) by replaying the block on its
calibration inputs with sparsifiers installed (``ctx.replay``), then install
:mod:`squeeze.runtime.act_sparse` sparsifiers. ``mode: topk`` records thresholds from input
samples seen in the statistics forward instead.
"""

from __future__ import annotations

import dataclasses

import torch

from squeeze import distributed, progress
from squeeze.adapters import Block, Linear
from squeeze.errors import SqueezeError
from squeeze.algorithms.actsparse import (
    ROTATED_SITES,
    SITES,
    column_norms,
    greedy_allocation,
    orthogonal_transform,
    parse_sites,
    sample_rows,
    scores,
    threshold_for,
    weighted_sparsity,
)
from squeeze.passes.base import BlockPass
from squeeze.runtime.act_sparse import ActSparsifier, block_sites, install, uninstall


class ActSparsityPass(BlockPass):
    weighted = False  # WINA weighs |x| by the consuming weight's column norms
    fresh_statistics = True  # always observe the block as changed by passes before (prune, then sparsify)

    @dataclasses.dataclass
    class Settings(BlockPass.Settings):
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
        self.site_names = parse_sites(s.sites)
        if not isinstance(s.transform, bool):
            raise SqueezeError(f"{self.name}: transform must be true or false, not {s.transform!r}")
        if s.transform and not self.weighted:
            raise SqueezeError(f"{self.name}: transform is WINA's orthogonal transform; use --method wina")

    def prepare(self, sweep) -> None:
        if self.settings.mode == "topk":  # its samples are drawn per batch from one generator
            distributed.refuse(f"{self.name} mode topk")
        super().prepare(sweep)
        self.report = {}
        self._gen = torch.Generator().manual_seed(self.settings.seed)

    def sweep_state(self) -> dict:  # the sampling generator runs on across blocks
        return {**super().sweep_state(), "generator": self._gen.get_state().tolist()}

    def load_sweep_state(self, state: dict) -> None:
        super().load_sweep_state(state)
        self._gen.set_state(torch.tensor(state["generator"], dtype=torch.uint8))

    # -- sites ---------------------------------------------------------------------------------
    def _sites(self, block: Block) -> dict:
        sites = block_sites(block.linears, self.site_names)
        allowed = {lin.name for lin in super().targets(block)}
        return {s: (h, [c for c in cs if c.name in allowed]) for s, (h, cs) in sites.items()
                if any(c.name in allowed for c in cs)}

    def targets(self, block: Block) -> list[Linear]:
        return [c for _, cs in self._sites(block).values() for c in cs]

    def observed(self, block: Block) -> list[Linear]:
        if self.settings.mode != "topk":  # thresholds come from replaying the block
            return []
        return [h for h, _ in self._sites(block).values()]

    def observe(self, ctx, linear, x, y):
        rows = max(1, self.settings.sample_tokens)
        ctx.scratch(self).setdefault(linear.name, []).append(sample_rows(x, rows, self._gen).cpu())

    # -- decide --------------------------------------------------------------------------------
    def _scale(self, host: Linear) -> torch.Tensor | None:
        return column_norms(host.weight) if self.weighted else None

    @staticmethod
    def _rotate(name: str, sites: dict) -> dict:
        """WINA's orthogonal transform for this block's shared-input sites: rotate every consumer
        W -> W V in place and return {site: (V, singular values)}; see
        :func:`squeeze.algorithms.actsparse.orthogonal_transform`."""
        out = {}
        for site in ROTATED_SITES:
            if site not in sites:
                continue
            consumers = sites[site][1]
            zeros = sum(int((c.weight == 0).sum()) for c in consumers) / sum(c.weight.numel() for c in consumers)
            if zeros > 0.01:
                raise SqueezeError(
                    f"{name}: transform rotates the weights of {', '.join(c.name for c in consumers)}, "
                    f"which are {zeros:.0%} zeros (pruned?): the rotation would make them dense again. "
                    "Use wina without transform after weight pruning.")
            rotated, v, sv = orthogonal_transform([c.weight for c in consumers])
            for c, w in zip(consumers, rotated):
                c.set_weight(w)
            out[site] = (v, sv)
        return out

    def decide(self, ctx) -> dict:
        s, block = self.settings, ctx.block
        sites = self._sites(block)
        rotated = self._rotate(self.name, sites) if s.transform else {}
        rotations = {site: v for site, (v, _) in rotated.items()}
        scales = {site: self._scale(host) for site, (host, _) in sites.items()}
        # a rotated site's (stacked) columns are orthogonal: their norms are the singular values
        scales.update({site: sv for site, (_, sv) in rotated.items()})

        def sorted_scores(site):  # mode topk: quantiles of the statistics forward's samples
            host = sites[site][0]
            x = torch.cat(ctx.scratch(self).get(host.name, []) or [torch.zeros(0, host.in_features)])
            x = sample_rows(x, s.sample_tokens, self._gen)
            if site in rotations:
                x = x.float() @ rotations[site]
            return scores(x, scales[site]).flatten().sort().values
        sizes = {site: sum(c.weight.numel() for c in cs) for site, (_, cs) in sites.items()}
        # Distributed: one process calibrates on the first tokens of batch 0, which is rank 0's
        # first batch, so rank 0's choice is exactly the single-process one; the others take it
        # (and skip the replays).
        alloc = thresholds = None
        if distributed.is_writer():
            if s.allocation == "greedy" and len(sites) > 1:
                alloc = self._greedy(ctx, sites, sizes, scales, rotations)
            else:
                alloc = {site: s.act_sparsity for site in sites}
            if s.mode == "threshold":
                # Thresholds from one replay of the block with every site sparse, each site
                # calibrated on its input as it arrives (downstream of the sites before it).
                thresholds = self._calibrated(ctx, sites, scales, alloc, rotations)
            else:
                thresholds = {site: threshold_for(sorted_scores(site), alloc[site]) for site in sites}
        alloc, thresholds = distributed.from_rank0((alloc, thresholds))
        out = {}
        for site in sites:
            out[site] = (alloc[site], thresholds[site], scales[site], rotations.get(site))
        self.report.setdefault(self.name, {})[str(block.index)] = {
            site: {"sparsity": round(sp, 4), "threshold": round(t, 6)} for site, (sp, t, *_) in out.items()}
        self.report[self.name][str(block.index)]["weighted"] = round(
            weighted_sparsity({k: v[0] for k, v in out.items()}, sizes), 4)
        return out

    def _make(self, host: Linear, sparsity: float, threshold: float, scale, rotation) -> ActSparsifier:
        sp = ActSparsifier(host.in_features, self.settings.mode, self.weighted, self.settings.dense_prefix,
                           rotated=rotation is not None)
        if scale is not None:
            sp.scale.copy_(scale)
        if rotation is not None:
            sp.rotation.copy_(rotation)
        sp.set(sparsity, threshold)
        return sp.to(host.module.weight.device)

    def _replay_tokens(self) -> int:
        """Tokens of the first calibration batch the threshold search replays."""
        return max(self.settings.greedy_tokens, self.settings.sample_tokens)

    @torch.no_grad()
    def _calibrated(self, ctx, sites, scales, alloc, rotations) -> dict:
        sps = {site: self._make(h, 0.0, 0.0, scales[site], rotations.get(site)) for site, (h, _) in sites.items()}
        for site, (h, cs) in sites.items():
            install(h, cs, sps[site])
            sps[site].calibrate_to = alloc[site]
        try:
            ctx.replay(self._replay_tokens())
            return {site: float(sp.threshold) for site, sp in sps.items()}
        finally:
            for _, cs in sites.values():
                uninstall(cs)

    @torch.no_grad()
    def _greedy(self, ctx, sites, sizes, scales, rotations) -> dict:
        n = self.settings.greedy_tokens
        sps = {site: self._make(h, 0.0, 0.0, scales[site], rotations.get(site)) for site, (h, _) in sites.items()}
        for site, (h, cs) in sites.items():
            install(h, cs, sps[site])
        try:
            # the reference output with every site at 0%: the dense block (its rotated sites
            # need their sparsifiers installed to rotate their inputs back into the weights' basis)
            dense = ctx.replay(n).float()
            norm = dense.pow(2).mean().clamp_min(1e-12)
            target = self.settings.act_sparsity
            # how many trials the search takes depends on which sites win: count them, and show
            # the sparsity the trials have reached
            with progress.phase("greedy allocation", unit="trial") as shown:
                def error_of(alloc):
                    for site, sp in alloc.items():
                        sps[site].calibrate_to = sp  # each trial's thresholds calibrated in order
                    out = ctx.replay(n).float()
                    shown.advance(sparsity=f"{weighted_sparsity(alloc, sizes):.2f}/{target:.2f}")
                    return float((out - dense).pow(2).mean() / norm)

                return greedy_allocation(sizes, target, error_of, self.settings.greedy_step)
        finally:
            for _, cs in sites.values():
                uninstall(cs)

    def apply(self, ctx, decisions) -> None:
        for site, (host, consumers) in self._sites(ctx.block).items():
            install(host, consumers, self._make(host, *decisions[site]))

    # -- report -------------------------------------------------------------------------------
    def per_layer(self) -> dict[str, list]:
        """The target sparsity of each block (weighted over its sites; greedy allocation moves it)
        and each site's threshold; the sparsity reached at run time is measured on the export
        (:class:`squeeze.evaluation.ActCounter`)."""
        blocks = self.report.get(self.name, {})
        order = sorted(blocks, key=int)
        out = {"target sparsity": [blocks[b]["weighted"] for b in order]}
        sites = [s for s in self.site_names if any(s in blocks[b] for b in order)]
        for site in sites:
            if self.settings.allocation == "greedy":
                out[f"{site} sparsity"] = [blocks[b].get(site, {}).get("sparsity") for b in order]
            out[f"{site} threshold"] = [blocks[b].get(site, {}).get("threshold") for b in order]
        return out

    def results(self) -> dict:
        return {}

    # -- export / load -------------------------------------------------------------------------
    def describe(self) -> dict:
        d = super().describe()
        d["weighted"] = self.weighted
        if self.settings.transform:
            d["runtime"] = ("squeeze.runtime.act_sparse (squeeze.load applies it). The q/k/v and gate/up weights "
                            "are stored rotated (WINA transform), which squeeze.load undoes on their inputs; "
                            "config.json is marked so transformers without squeeze refuses the export")
        else:
            d["runtime"] = ("squeeze.runtime.act_sparse (squeeze.load applies the thresholds; config.json is marked "
                            "so transformers without squeeze refuses the export instead of running it dense)")
        return d
