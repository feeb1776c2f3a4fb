"""Wanda-style weight localization: ConceptPrune's target-vs-base masks and pure Wanda.

- **Wanda** (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
  Models", ICLR 2024, §3 eq. 1): S_ij = |W_ij| · ‖X_j‖₂, X_j the j-th input feature over all
  calibration tokens; the lowest `sparsity` fraction of each output row is pruned.
- **ConceptPrune** (Chavhan et al., "ConceptPrune", arXiv 2405.19237; applied to memorization in
  "Memorized Images in Diffusion Models share a Subspace that can be Located and Deleted", arXiv
  2406.18566): on the inputs of every FFN output projection (`ff.net.2`), per denoiser call t and site l,
  column norms N_{t,l}[j] = sqrt(Σ_rows x̂_{r,j}²) of the row-normalised activations (each token row
  scaled to unit L2 norm; `row_normalize=False` turns that off); per output row the top
  `skill_ratio` fraction of S_tgt = |W| · N_tgt, AND-ed with S_tgt > S_base (N_tgt[j] > N_base[j]);
  the masks of the first τ calls are united (count > `select_ratio`·τ; 0 = OR). Defaults from the
  reference code (shared/research/localization.md §2.2): skill_ratio 0.01, τ 10, select_ratio 0,
  base prompts "" (one per target prompt), guidance 7.5, 50 steps, seed 0.
- `roles` picks other Linear sites, as the reference code's `--hook_module` does (`unet-ffn-1` = ffn_in,
  `attn_key` = cross_attn_key, `attn_val` = cross_attn_value); ConceptPrune's default and ours is ffn_out.
  A key or value projection reads the text, so its column norms are the same at every denoiser call.

Column norms accumulate on the model's device (sums of squares per call, float32); activations are
never copied to the CPU (only each prompt's (τ, d_in) sums are), and sampling stops after the τ-th
denoiser call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from localization.sharding import Shard, map_prompts
from workbench.errors import WorkbenchError
from workbench.graph import parse_role
from workbench.models.model import Model
from workbench.models.sites import Role, Site
from workbench.neurons import WeightMask
from workbench.sampling import generate


FFN_OUT_ONLY = (Role.FFN_OUT.value,)  # ConceptPrune's sites: the inputs of every `ff.net.2`


@dataclass(frozen=True)
class WandaConfig:
    """ConceptPrune / Wanda settings; defaults are ConceptPrune's for memorization."""

    skill_ratio: float = 0.01  # ConceptPrune: top fraction of each output row (by target score) selected
    calls: int = 10  # τ: denoiser calls whose masks are united
    select_ratio: float = 0.0  # a weight is kept in the union if selected in more than select_ratio·τ calls
    row_normalize: bool = True  # ConceptPrune L2-normalises each token row; plain Wanda does not
    mode: str = "conceptprune"  # or "wanda": lowest `sparsity` per row of |W|·‖X‖ over the target prompts
    sparsity: float = 0.5  # pure Wanda only
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    roles: tuple[str, ...] = FFN_OUT_ONLY  # the Linear sites whose inputs are scored (hook_module)

    def __post_init__(self) -> None:
        if not self.roles:
            raise WorkbenchError("give at least one role for Wanda's sites, e.g. ffn_out")
        for role in self.roles:
            parse_role(role)
        if self.mode not in ("conceptprune", "wanda"):
            raise WorkbenchError(f"unknown Wanda mode {self.mode!r}; use conceptprune or wanda")
        if not 0 < self.skill_ratio <= 1 or not 0 < self.sparsity <= 1:
            raise WorkbenchError("skill_ratio and sparsity must be in (0, 1]")
        if self.calls < 1 or self.calls > self.steps or not 0 <= self.select_ratio < 1:
            raise WorkbenchError(f"calls must be in 1..steps ({self.steps}) and select_ratio in [0, 1)")


def wanda_sites(model: Model, roles: Sequence[str] = FFN_OUT_ONLY) -> list[Site]:
    """The Linear sites of `roles` (default the FFN output projections, `ff.net.2`) whose inputs Wanda scores."""
    sites = [s for s in model.graph.select(roles=list(roles)) if s.kind == "linear"]
    if not sites:
        raise WorkbenchError(f"the {model.family} denoiser has no Linear sites of role {', '.join(roles)} to score; "
                             "check Wanda's roles")
    return sites


class _Stop(Exception):
    """Raised after the last denoiser call that matters: ends the sampling loop early."""


@contextmanager
def column_norms(model: Model, sums: dict[str, torch.Tensor], row_normalize: bool) -> Iterator[None]:
    """While the block runs one sampling loop, add each denoiser call's squared (row-normalised) inputs
    of every site to `sums[site][call]` (shape (τ, d_in)); the loop is stopped (`_Stop`) after τ calls."""
    calls = next(iter(sums.values())).shape[0]
    call = [-1]

    def count(module, args, kwargs):
        call[0] += 1
        if call[0] >= calls:
            raise _Stop

    def hook(path):
        def record(module, args):
            rows = args[0].detach().float().flatten(0, -2)
            if row_normalize:
                rows = F.normalize(rows, p=2, dim=1)
            sums[path][call[0]] += rows.square().sum(dim=0)
        return record

    handles = [model.denoiser.register_forward_pre_hook(count, with_kwargs=True)]
    handles += [model.module(path).register_forward_pre_hook(hook(path)) for path in sums]
    try:
        yield
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()


def prompt_square_sums(model: Model, prompt: str, config: WandaConfig) -> dict[str, torch.Tensor]:
    """One prompt's per-site (τ, d_in) sums of squared (row-normalised) inputs, from seed `config.seed`."""
    sums = {s.path: torch.zeros(config.calls, s.in_features, device=model.device)
            for s in wanda_sites(model, config.roles)}
    with column_norms(model, sums, config.row_normalize):
        generate(model, [prompt], seed=config.seed, steps=config.steps, guidance_scale=config.guidance_scale)
    return sums


def collect_norms(model: Model, prompts: Sequence[str], config: WandaConfig,
                  shard: Shard = Shard()) -> dict[str, torch.Tensor]:
    """N_{t,l}: per site, (τ, d_in) column norms over every token of `prompts` (both CFG halves).

    One prompt at a time, each from `seed`, as the reference does; the per-prompt sums are added in
    prompt order, so a sharded run (`shard`) gives the single-process norms bit for bit.
    """
    if not prompts:
        raise WorkbenchError("column norms need at least one prompt")
    per_prompt = map_prompts(lambda prompt: {path: total.cpu() for path, total in
                                             prompt_square_sums(model, prompt, config).items()}, prompts, shard)
    totals = per_prompt[0]
    for sums in per_prompt[1:]:
        totals = {path: totals[path] + sums[path] for path in totals}
    return {path: total.sqrt().to(model.device) for path, total in totals.items()}


def top_per_row(scores: torch.Tensor, fraction: float, largest: bool = True) -> torch.Tensor:
    """Bool mask of the int(fraction · d_in) highest (or lowest) scores of each output row."""
    k = int(fraction * scores.shape[1])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=largest).indices, True)
    return mask


def conceptprune_mask(weight: torch.Tensor, target: torch.Tensor, base: torch.Tensor,
                      config: WandaConfig) -> torch.Tensor:
    """Union over calls of (top skill_ratio per row of |W|·N_tgt) AND (N_tgt > N_base); target/base (τ, d_in)."""
    magnitude = weight.detach().abs().float()
    votes = torch.zeros_like(magnitude, dtype=torch.int32)
    for t in range(target.shape[0]):
        selected = top_per_row(magnitude * target[t][None, :], config.skill_ratio)
        votes += (selected & (target[t] > base[t])[None, :]).int()
    return votes > config.select_ratio * target.shape[0]


def wanda_mask(weight: torch.Tensor, norms: torch.Tensor, config: WandaConfig) -> torch.Tensor:
    """Pure Wanda: the lowest `sparsity` of each row of |W|·‖X‖ (‖X‖ over all τ calls together)."""
    total = norms.square().sum(dim=0).sqrt()
    return top_per_row(weight.detach().abs().float() * total[None, :], config.sparsity, largest=False)


def localize_weights(model: Model, prompts: Sequence[str], config: WandaConfig = WandaConfig(),
                     base_prompts: Sequence[str] | None = None, shard: Shard = Shard()) -> WeightMask:
    """The weight mask of `config.mode` for the target `prompts` (base: "" per prompt by default);
    `shard` splits the prompts over processes (`localization.sharding`)."""
    if not prompts:
        raise WorkbenchError("give at least one target prompt")
    target = collect_norms(model, prompts, config, shard)
    masks = {}
    if config.mode == "wanda":
        for path, norms in target.items():
            masks[path] = wanda_mask(model.module(path).weight, norms, config).cpu()
        return WeightMask(masks)
    base = collect_norms(model, list(base_prompts) if base_prompts is not None else [""] * len(prompts), config, shard)
    for path, norms in target.items():
        masks[path] = conceptprune_mask(model.module(path).weight, norms, base[path], config).cpu()
    return WeightMask(masks)
