"""Cross-attention layer ablation and attention entropy: which layers carry a prompt's memorization or
a concept.

1. **Layer ablation**: for each cross-attention layer, its output is replaced by the output it gives
   the null ("") prompt (`mode="null"`: the layer alone sees the empty prompt's keys and values) or by
   zero (`mode="zero"`), and the drop of a score is measured: a memorization score (NeMo's noise
   consistency, mean over prompts) or the concept classifier's probability of a label in generations.
   Layers are ranked by the drop. For MMDiT (joint attention; our extension) a layer is its text
   stream's keys and values: `mode="null"` gives them the values they take, at the same call, when
   the whole denoiser sees the empty prompt (one extra denoiser pass per call); `mode="zero"` zeroes
   the text values (`add_v_proj`).
2. **Attention entropy** (Ren et al., "Unveiling and Mitigating Memorization in Text-to-image
   Diffusion Models through Cross Attention", ECCV 2024, §3): per layer, the entropy over text tokens
   of the cross-attention distribution, −Σ_k p_k log p_k, averaged over queries, heads and denoising
   steps (conditional branch). Memorized prompts concentrate attention on few tokens (lower entropy).
   For MMDiT (our extension) the image queries' attention is restricted to the text tokens and
   renormalised there: the cross-attention part of joint attention.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from localization.detection import NemoConfig, nemo_scores
from workbench.errors import WorkbenchError
from workbench.models.model import Model
from workbench.models.sites import Role
from workbench.sampling import encode, generate

MODES = ("null", "zero")
_QK_NORMS = {False: ("norm_q", "norm_k"), True: ("norm_q", "norm_added_k")}  # per head, before the product


@dataclass(frozen=True)
class AblationConfig:
    """Layer ablation against the memorization score or, with `concept` ("head=label", e.g. "subject=house")
    and `classifier` (a folder written by `workbench testbed classifier`), against the classifier's
    probability of that label on `concept_seeds` generations per prompt; plus attention entropy (needs
    holdout prompts)."""

    mode: str = "null"
    detection: NemoConfig = NemoConfig()
    entropy: bool = True
    steps: int = 25
    guidance_scale: float = 5.0
    concept: str | None = None
    classifier: str | None = None
    concept_seeds: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise WorkbenchError(f"unknown ablation mode {self.mode!r}; use one of {', '.join(MODES)}")
        if (self.concept is None) != (self.classifier is None):
            raise WorkbenchError("a concept score needs both concept (head=label) and classifier (its folder)")
        if self.concept is not None and len([part for part in self.concept.split("=") if part.strip()]) != 2:
            raise WorkbenchError(f"concept {self.concept!r} must read head=label, e.g. subject=house")
        if self.concept_seeds < 1:
            raise WorkbenchError("concept_seeds must be >= 1")

    @property
    def concept_label(self) -> tuple[str, str]:
        head, label = (part.strip() for part in (self.concept or "").split("="))
        return head, label


@dataclass(frozen=True)
class CrossAttentionLayer:
    path: str  # the attention module
    block: str
    query: str  # its site paths: the image-stream queries that read the text keys and values
    key: str
    value: str


def cross_attention_layers(model: Model) -> list[CrossAttentionLayer]:
    """Every attention module that reads the text, in execution order (by its key projection)."""
    key_role = Role.CONTEXT_KEY if model.family == "mmdit" else Role.CROSS_ATTN_KEY
    layers = []
    for key in model.graph.select(roles=[key_role]):
        parent = key.path.rsplit(".", 1)[0]
        value = "add_v_proj" if model.family == "mmdit" else "to_v"
        layers.append(CrossAttentionLayer(parent, key.block, f"{parent}.to_q", key.path, f"{parent}.{value}"))
    if not layers:
        raise WorkbenchError(f"the {model.family} denoiser has no cross-attention layers")
    return layers


def _null_text(model: Model) -> dict[str, torch.Tensor]:
    """What a cross-attention layer reads for the empty prompt: states (1, T, D) and, for PixArt, the mask bias."""
    cond = encode(model, [""], cfg=False).kwargs
    states = model.adapter.text_value_input(model.denoiser, cond)
    out = {"encoder_hidden_states": states}
    if "encoder_attention_mask" in cond:  # PixArt turns the mask into an additive bias before the blocks
        out["attention_mask"] = ((1 - cond["encoder_attention_mask"].to(states.dtype)) * -10000.0).unsqueeze(1)
    return out


@contextmanager
def layer_ablation(model: Model, layer: CrossAttentionLayer, mode: str = "null") -> Iterator[None]:
    """Replace `layer`'s output by its output for the empty prompt, or by zero, while the block runs."""
    if mode not in MODES:
        raise WorkbenchError(f"unknown ablation mode {mode!r}; use one of {', '.join(MODES)}")
    attention = model.denoiser.get_submodule(layer.path)
    if model.family == "mmdit":
        if mode == "zero":
            handles = [model.denoiser.get_submodule(layer.value).register_forward_hook(
                lambda module, args, output: torch.zeros_like(output))]
        else:
            handles = _null_text_stream(model, layer)
    elif mode == "zero":
        handles = [attention.register_forward_hook(lambda module, args, output: torch.zeros_like(output))]
    else:
        null = _null_text(model)
        if null["encoder_hidden_states"] is None:
            raise WorkbenchError(f"mode='null' needs the text input of the {model.family} layers; use mode='zero'")

        def swap(module, args, kwargs):
            batch = args[0].shape[0] if args else kwargs["hidden_states"].shape[0]
            kwargs = dict(kwargs)
            for name, value in null.items():
                kwargs[name] = value.expand(batch, *value.shape[1:])
            return args, kwargs
        handles = [attention.register_forward_pre_hook(swap, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _null_text_stream(model: Model, layer: CrossAttentionLayer) -> list:
    """MMDiT null mode: before each denoiser call, the same call on the empty prompt records the layer's
    text keys and values; the real call then uses those."""
    null = encode(model, [""], cfg=False).kwargs
    recorded: dict[str, torch.Tensor] = {}
    inside = [False]

    def null_pass(module, args, kwargs):
        if inside[0]:
            return None
        batch = (args[0] if args else kwargs["hidden_states"]).shape[0]
        empty = {**kwargs, **{name: value.expand(batch, *value.shape[1:]) for name, value in null.items()}}
        inside[0] = True
        try:
            module(*args, **empty)
        finally:
            inside[0] = False
        return None

    def keep_or_replace(path):
        def hook(module, args, output):
            if inside[0]:
                recorded[path] = output
                return None
            return recorded.pop(path)
        return hook

    handles = [model.denoiser.register_forward_pre_hook(null_pass, with_kwargs=True)]
    return handles + [model.denoiser.get_submodule(path).register_forward_hook(keep_or_replace(path))
                      for path in (layer.key, layer.value)]


def memorization_score(model: Model, prompts: Sequence[str], config: NemoConfig = NemoConfig()) -> Callable[[], float]:
    """Mean NeMo noise-consistency score of `prompts` (higher = more memorized)."""
    return lambda: float(sum(s.score for s in nemo_scores(model, prompts, config)) / len(prompts))


def concept_probability(model: Model, classifier: torch.nn.Module, head: str, label: str, prompts: Sequence[str],
                        seeds: int = 4, steps: int = 25, guidance_scale: float = 5.0) -> Callable[[], float]:
    """Mean probability the concept classifier gives `label` of `head` on generations of `prompts`."""
    if label not in classifier.labels.get(head, ()):
        known = ", ".join(f"{h}={v}" for h, values in classifier.labels.items() for v in values)
        raise WorkbenchError(f"the classifier has no concept {head}={label}; use one of {known}")
    index = classifier.labels[head].index(label)

    def score() -> float:
        images = torch.cat([generate(model, [p] * seeds, seed=0, steps=steps, guidance_scale=guidance_scale)
                            for p in prompts])
        with torch.no_grad():
            return float(classifier(images)[head].softmax(-1)[:, index].mean())
    return score


def rank_layers(model: Model, score: Callable[[], float], mode: str = "null",
                advance: Callable[[str], None] = lambda text: None) -> list[dict]:
    """Each cross-attention layer's score drop when ablated, largest drop first."""
    base = score()
    ranking = []
    for layer in cross_attention_layers(model):
        advance(layer.path)
        with layer_ablation(model, layer, mode):
            value = score()
        ranking.append({"layer": layer.path, "block": layer.block, "score": value, "drop": base - value,
                        "base": base, "mode": mode})
    return sorted(ranking, key=lambda r: -r["drop"])


def attention_entropy(model: Model, prompts: Sequence[str], *, steps: int = 25, guidance_scale: float = 5.0,
                      seed: int = 0) -> dict[str, float]:
    """Per cross-attention layer: mean entropy (nats) of the attention over text tokens (module docstring)."""
    layers = cross_attention_layers(model)
    totals = {layer.path: [0.0, 0] for layer in layers}
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:
        attention = model.denoiser.get_submodule(layer.path)
        handles.append(attention.register_forward_pre_hook(  # PixArt's text mask, as an additive bias
            lambda m, a, kwargs, path=layer.path: captured.__setitem__(f"{path}#mask", kwargs.get("attention_mask")),
            with_kwargs=True))
        handles.append(model.denoiser.get_submodule(layer.query).register_forward_hook(
            lambda m, a, out, path=layer.path: captured.__setitem__(path, out.detach())))

        def entropy_hook(module, args, kwargs, out, path=layer.path, attention=attention):
            query, mask = captured.pop(path), captured.pop(f"{path}#mask")
            key = out.detach()
            rows = query.shape[0] // 2 if model.cfg_active else 0  # conditional half only
            query, key = query[rows:], key[rows:]
            q = query.unflatten(-1, (attention.heads, -1)).transpose(1, 2)
            k = key.unflatten(-1, (attention.heads, -1)).transpose(1, 2)
            q_norm, k_norm = (getattr(attention, name, None) for name in _QK_NORMS[model.family == "mmdit"])
            q, k = (norm(x) if norm is not None else x for norm, x in ((q_norm, q), (k_norm, k)))
            logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            if mask is not None:
                logits = logits + mask[rows:].unsqueeze(1)
            p = logits.float().softmax(-1)
            totals[path][0] += float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())
            totals[path][1] += 1
        handles.append(model.denoiser.get_submodule(layer.key).register_forward_hook(entropy_hook, with_kwargs=True))
    try:
        for prompt in prompts:
            generate(model, [prompt], seed=seed, steps=steps, guidance_scale=guidance_scale)
    finally:
        for handle in handles:
            handle.remove()
    return {path: total / max(count, 1) for path, (total, count) in totals.items()}
