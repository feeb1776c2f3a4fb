"""`workbench localize ...`: find where prompts are stored in a model, one method per command."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer

from workbench.cli_support import DeviceOpt, DtypeOpt, FamilyOpt, JsonOpt, ModelArg, comma_list, console, \
    load_model, print_json, user_errors, with_status

if TYPE_CHECKING:
    from localization.localize import Localization
    from localization.sharding import Shard

localize_app = typer.Typer(help="Localize memorized prompts or concepts on the neuron graph.", no_args_is_help=True)

PromptsOpt = Annotated[Path, typer.Option("--prompts", help="Text file, one target prompt per line.")]
OutOpt = Annotated[Optional[Path], typer.Option(help="Save the localization (JSON) here.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing --out / --graph file.")]


def _check_mask_outputs(out: Path, overwrite: bool) -> None:
    """Before any work: both files a weight-mask localization writes (the JSON and the mask beside it)."""
    from localization.localize import Localization
    from workbench.io import check_writable

    for path in (out, Localization.mask_path(out)):
        check_writable(path, overwrite=overwrite)


def _run_sharded(json_out: bool, description: str,
                 run: Callable[[Shard, Callable[[str], None]], Localization]) -> Localization | None:
    """`run(shard, advance)` under a spinner; under `accelerate launch`, None on every process but the main one
    (which writes and prints)."""
    from localization.sharding import current_shard

    shard = current_shard()
    result = with_status(json_out or shard.index > 0, description, lambda advance: run(shard, advance))
    return result if shard.index == 0 else None


def _save_mask_localization(result, out: Path, overwrite: bool, json_out: bool) -> None:
    """Save a weight-mask localization (JSON + mask beside it) and report it; warn when it selects nothing."""
    result.save(out, overwrite=overwrite)
    if result.extra["weights"] == 0:
        typer.echo(f"warning: the {result.method} mask selects no weight (fraction × row or site size < 1); "
                   "raise the fraction", err=True)
    summary = {"localization": str(out), "mask": str(result.mask_path(out)), "density": result.extra["density"],
               "weights": result.extra["weights"],
               "per_site": {site: int(mask.sum()) for site, mask in result.mask.items()}}
    if json_out:
        print_json({**result.to_json(), **summary})
        return
    console.print(f"{result.method}: {summary['weights']:,} weights ({summary['density']:.3%} of the masked sites) "
                  f"→ {out}, mask {summary['mask']}", highlight=False)


@localize_app.command("nemo")
def nemo(model: ModelArg, prompts: PromptsOpt,
         holdout: Annotated[Path, typer.Option(help="Non-memorized prompts, one per line: NeMo's activation "
                                                    "statistics and (without --threshold) its threshold.")],
         threshold: Annotated[Optional[float], typer.Option(
             help="Memorization threshold of the noise-consistency score (default: mean + 1 std on --holdout).")]
         = None,
         sites: Annotated[str, typer.Option(help="official (SD 1.x's seven down/mid value sites), all_value, "
                                                   "or comma-separated blocks (down.1,up.0).")]
         = "official",
         legacy: Annotated[bool, typer.Option(help="The reference code's behaviour: timesteps[1], top-k on raw "
                                                   "activations, absolute token mean.")] = False,
         search_score: Annotated[str, typer.Option(
             help="reference (each seed's δ against its un-blocked δ, the reference code) or consistency (the "
                  "detector's cross-seed score, which the threshold is calibrated on; our option).")] = "reference",
         seeds: Annotated[int, typer.Option(help="Initial latents per prompt (the paper's 10).")] = 10,
         image_check: Annotated[Optional[float], typer.Option(
             help="Also require each accepted set to take the image away: mean SSIM of its generations to the "
                  "un-blocked ones below this bound, e.g. 0.5 (our option; off: the paper's score only).")] = None,
         image_seeds: Annotated[int, typer.Option(help="Generations per set for --image-check.")] = 4,
         image_steps: Annotated[Optional[int], typer.Option(
             help="Sampling steps of the --image-check generations (default: the pipeline's).")] = None,
         deactivation: Annotated[str, typer.Option(
             help="How a neuron is switched off: zero (the paper) or mean (its holdout mean; our option).")]
         = "zero",
         tie_margin: Annotated[float, typer.Option(
             help="Refinement drops a part only below the threshold minus this (0 = the paper; 1e-5 settles "
                  "float ties the same way at any batch size; our option).")] = 0.0,
         out: OutOpt = None, graph: Annotated[Optional[Path], typer.Option(
             help="Save the neuron graph with the found neurons marked (attribute nemo_prompts).")] = None,
         overwrite: OverwriteOpt = False, json_out: JsonOpt = False, device: DeviceOpt = "cpu",
         dtype: DtypeOpt = "float32", family: FamilyOpt = "auto") -> None:
    """NeMo (Hintersdorf et al., NeurIPS 2024): the value neurons that carry each memorized prompt.

    `accelerate launch -m workbench.cli localize nemo ...` runs the same command over several processes."""
    with user_errors():
        from dataclasses import replace

        from rich.markup import escape
        from rich.progress import Progress
        from rich.table import Table

        from localization.detection import check_nemo_threshold, read_prompts
        from localization.localize import localize
        from localization.nemo import NemoLocalizationConfig
        from localization.nemo_image import ImageCheck
        from localization.sharding import current_shard
        from workbench.errors import WorkbenchError
        from workbench.io import check_writable

        if out is not None and graph is not None and out.resolve() == graph.resolve():
            raise WorkbenchError("--out and --graph name the same file; give two paths")
        for path in (out, graph):
            if path is not None:
                check_writable(path, overwrite=overwrite)
        check_nemo_threshold(threshold)
        targets, calibration = read_prompts(prompts), read_prompts(holdout)
        check = None if image_check is None else ImageCheck(image_check, image_seeds, steps=image_steps)
        config = NemoLocalizationConfig(sites=sites, legacy=legacy, search_score=search_score, image_check=check,
                                        deactivation=deactivation, tie_margin=tie_margin)
        config = replace(config, detection=replace(config.detection, n_seeds=seeds))
        loaded = load_model(model, device, dtype, family)
        shard = current_shard()  # under `accelerate launch`, prompts are split over the processes
        with Progress(console=console, disable=json_out or shard.index > 0, transient=True) as progress:
            task = progress.add_task("nemo", total=len(targets) + (1 if threshold is not None else 2))
            result = localize(loaded, "nemo", targets, config=config, holdout=calibration, threshold=threshold,
                              shard=shard,
                              advance=lambda text: progress.update(task, advance=1, description=escape(text)))
        if shard.index > 0:
            return  # the main process writes and prints
        if out is not None:
            result.save(out, overwrite=overwrite)
        if graph is not None:
            annotated = loaded.graph
            result.write_onto(annotated)
            annotated.save(graph, overwrite=overwrite)
        if json_out:
            print_json({**result.to_json(), "files": {"localization": str(out) if out else None,
                                                      "graph": str(graph) if graph else None}})
            return
        console.print(f"threshold {result.provenance['threshold']:.4f} ({result.provenance['threshold_source']})",
                      highlight=False)
        table = Table()
        columns = ["prompt", "memorized", "score", "initial", "refined", "refined score", "forwards"]
        for column in columns + (["image SSIM"] if check else []):
            table.add_column(column, justify="left" if column == "prompt" else "right")
        for r in result.results:
            refined = "-" if r["refined_score"] is None else f"{r['refined_score']:.3f}"
            image = [] if not check else ["-" if r["refined_image_ssim"] is None else f"{r['refined_image_ssim']:.3f}"]
            table.add_row(escape(r["prompt"]), "yes" if r["memorized"] else "no", f"{r['detection_score']:.3f}",
                          str(r["initial"]["count"]), str(r["count"]), refined, str(r["denoiser_forwards"]), *image)
        console.print(table)
        per_site = {}
        for site, index in result.neurons:
            per_site[site] = per_site.get(site, 0) + 1
        for site, count in per_site.items():
            console.print(f"  {site}: {count} neuron(s)", highlight=False)


@localize_app.command("wanda")
def wanda(model: ModelArg, prompts: PromptsOpt,
          base: Annotated[Optional[Path], typer.Option(help="Base prompts, one per line (default: the empty "
                                                            "prompt once per target, ConceptPrune's choice).")] = None,
          mode: Annotated[str, typer.Option(help="conceptprune (target vs base) or wanda (lowest per row).")]
          = "conceptprune",
          skill_ratio: Annotated[float, typer.Option(help="Top fraction of each output row (ConceptPrune).")] = 0.01,
          calls: Annotated[int, typer.Option(help="τ: first denoiser calls whose masks are united.")] = 10,
          sparsity: Annotated[float, typer.Option(help="Pruned fraction of each row (pure Wanda).")] = 0.5,
          roles: Annotated[str, typer.Option(help="Comma-separated roles of the Linear sites scored: ffn_out "
                                                  "(ConceptPrune), or e.g. ffn_in, cross_attn_key, cross_attn_value.")]
          = "ffn_out",
          out: Annotated[Path, typer.Option(help="Save the localization (JSON; the mask beside it).")]
          = Path("wanda.json"),
          overwrite: OverwriteOpt = False, json_out: JsonOpt = False, device: DeviceOpt = "cpu",
          dtype: DtypeOpt = "float32", family: FamilyOpt = "auto") -> None:
    """Wanda / ConceptPrune (Sun et al. ICLR 2024; Chavhan et al. 2024): FFN weights that carry the prompts."""
    with user_errors():

        from localization.detection import read_prompts
        from localization.localize import localize
        from localization.wanda import WandaConfig

        _check_mask_outputs(out, overwrite)
        targets = read_prompts(prompts)
        bases = read_prompts(base) if base is not None else None
        config = WandaConfig(mode=mode, skill_ratio=skill_ratio, calls=calls, sparsity=sparsity,
                             roles=comma_list(roles) or ())
        loaded = load_model(model, device, dtype, family)
        result = _run_sharded(json_out, "wanda: column norms", lambda shard, advance: localize(
            loaded, "wanda", targets, config=config, holdout=bases, shard=shard, advance=advance))
        if result is not None:
            _save_mask_localization(result, out, overwrite, json_out)


@localize_app.command("salun")
def salun(model: ModelArg, prompts: PromptsOpt,
          images: Annotated[Optional[Path], typer.Option(help="Forget images, one path per line, aligned with "
                                                              "--prompts (default: one generation per prompt).")]
          = None,
          fraction: Annotated[float, typer.Option(help="Share of weights kept as salient (SalUn's 0.5).")] = 0.5,
          per_layer: Annotated[bool, typer.Option(help="Top fraction within each site instead of globally.")]
          = False,
          roles: Annotated[Optional[str], typer.Option(help="Comma-separated roles to restrict to, e.g. "
                                                             "cross_attn_key,cross_attn_value.")] = None,
          out: Annotated[Path, typer.Option(help="Save the localization (JSON; the mask beside it).")]
          = Path("salun.json"),
          overwrite: OverwriteOpt = False, json_out: JsonOpt = False, device: DeviceOpt = "cpu",
          dtype: DtypeOpt = "float32", family: FamilyOpt = "auto") -> None:
    """SalUn (Fan et al., ICLR 2024): weights salient for the forgetting loss of the prompts' images."""
    with user_errors():
        from localization.detection import read_prompts
        from localization.localize import localize
        from localization.salun import SalUnConfig
        from workbench.errors import WorkbenchError
        from workbench.io import read_rgb_images

        _check_mask_outputs(out, overwrite)
        targets = read_prompts(prompts)
        forget = None
        if images is not None:
            paths = read_prompts(images)
            if len(paths) != len(targets):
                raise WorkbenchError(f"{len(paths)} images for {len(targets)} prompts; give one image per prompt")
            forget = read_rgb_images(paths, "forget image")
        config = SalUnConfig(fraction=fraction, per_layer=per_layer,
                             roles=comma_list(roles))
        loaded = load_model(model, device, dtype, family)
        result = _run_sharded(json_out, "salun", lambda shard, advance: localize(
            loaded, "salun", targets, config=config, images=forget, shard=shard, advance=advance))
        if result is not None:
            _save_mask_localization(result, out, overwrite, json_out)


@localize_app.command("ablation")
def ablation(model: ModelArg, prompts: PromptsOpt,
             holdout: Annotated[Optional[Path], typer.Option(
                 help="Ordinary prompts, one per line: adds the attention entropy of prompts vs these.")] = None,
             mode: Annotated[str, typer.Option(help="null (the layer sees the empty prompt) or zero.")] = "null",
             concept: Annotated[Optional[str], typer.Option(
                 help="Rank by the drop of a classifier's probability of HEAD=LABEL (e.g. subject=house) on "
                      "generations of the prompts, instead of the memorization score; needs --classifier.")] = None,
             classifier: Annotated[Optional[Path], typer.Option(
                 help="Concept classifier folder (`workbench testbed classifier`).")] = None,
             concept_seeds: Annotated[int, typer.Option(help="Generations per prompt for --concept.")] = 4,
             out: OutOpt = None, overwrite: OverwriteOpt = False, json_out: JsonOpt = False,
             device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32", family: FamilyOpt = "auto") -> None:
    """Cross-attention layer ablation: rank layers by how much switching each off lowers memorization (or a
    concept's classifier probability)."""
    with user_errors():
        from rich.table import Table

        from localization.ablation import AblationConfig
        from localization.detection import read_prompts
        from localization.localize import localize
        from workbench.io import check_writable

        if out is not None:
            check_writable(out, overwrite=overwrite)
        targets = read_prompts(prompts)
        ordinary = read_prompts(holdout) if holdout is not None else None
        config = AblationConfig(mode=mode, concept=concept, classifier=str(classifier) if classifier else None,
                                concept_seeds=concept_seeds)
        loaded = load_model(model, device, dtype, family)
        result = with_status(json_out, "ablation", lambda advance: localize(
            loaded, "ablation", targets, config=config, holdout=ordinary, advance=advance))
        if out is not None:
            result.save(out, overwrite=overwrite)
        if json_out:
            print_json(result.to_json())
            return
        table = Table(title=f"layers by the drop of the {result.extra['score']} ({mode} ablation)")
        for column in ("layer", "block", "score", "drop", "entropy Δ (prompts − holdout)"):
            table.add_column(column)
        entropy = result.extra.get("entropy", {})
        for r in result.extra["ranking"]:
            delta = entropy.get(r["layer"], {}).get("difference")
            table.add_row(r["layer"], r["block"], f"{r['score']:.4f}", f"{r['drop']:+.4f}",
                          "-" if delta is None else f"{delta:+.4f}")
        console.print(table)
