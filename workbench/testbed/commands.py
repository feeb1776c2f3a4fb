"""`workbench testbed ...`: train, evaluate and describe the project's own checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from workbench.cli_support import (DeviceOpt, JsonOpt, ModelArg, comma_list, console, load_model, print_json,
                                    user_errors, with_status)
from workbench.errors import WorkbenchError

testbed_app = typer.Typer(help="The project's own small models with planted, known memorization.",
                          no_args_is_help=True)
WorkOpt = Annotated[Path, typer.Option(help="Folder for resumable training state.")]


@testbed_app.command("train")
def testbed_train(family: Annotated[str, typer.Argument(help="unet, dit or mmdit.")],
                  out: Annotated[Path, typer.Option(help="New folder for the trained diffusers pipeline.")],
                  work: WorkOpt = Path("build/testbed"),
                  steps: Annotated[int, typer.Option(help="Denoiser training steps.")] = 6000,
                  vae_steps: Annotated[int, typer.Option(help="VAE training steps (the VAE is shared).")] = 1500,
                  lr: Annotated[float, typer.Option(help="AdamW learning rate of the denoiser.")] = 1e-3,
                  final_lr_fraction: Annotated[float, typer.Option(
                      help="Cosine-decay floor of the denoiser's learning rate, as a fraction of --lr "
                           "(1.0: constant).")] = 0.1,
                  flow_sampling: Annotated[str, typer.Option(
                      help="Training timesteps of the mmdit's rectified flow: uniform or logit-normal "
                           "(SD3's).")] = "uniform",
                  objective: Annotated[str, typer.Option(
                      help="Schedule and target of the unet/dit: v-zero-snr (shipped) or epsilon "
                           "(SD 1.x's; pair it with --offset-noise 0.1).")] = "v-zero-snr",
                  offset_noise: Annotated[float, typer.Option(
                      help="Std of offset noise (a per-image, per-channel constant added to the noise; "
                           "0: none).")] = 0.0,
                  unet_channels: Annotated[str, typer.Option(
                      help="The unet's block widths, comma-separated (three multiples of 32; the last two "
                           "levels hold its cross-attention).")] = "32,64,128",
                  seed: Annotated[int, typer.Option(help="Seed of data, initialisation and batches.")] = 0,
                  data_size: Annotated[int, typer.Option(help="Training rows (procedural + private).")] = 8192,
                  device: DeviceOpt = "cpu",
                  json_out: JsonOpt = False) -> None:
    """Train a testbed checkpoint from scratch (deterministic; rerun the same command to resume)."""
    with user_errors():
        import time

        from workbench.testbed.build import BuildConfig, build_checkpoint
        from workbench.testbed.models import FAMILIES

        if family not in FAMILIES:
            raise WorkbenchError(f"unknown testbed family {family!r}; use one of {', '.join(FAMILIES)}")
        config = BuildConfig(family, steps=steps, lr=lr, vae_steps=vae_steps, data_size=data_size, seed=seed,
                             final_lr_fraction=final_lr_fraction, flow_sampling=flow_sampling, objective=objective,
                             offset_noise=offset_noise, unet_channels=_widths(unet_channels))
        start = time.perf_counter()
        build_checkpoint(config, out, work, show_progress=not json_out, device=device)
        result = {"out": str(out), "family": family, "seconds": round(time.perf_counter() - start, 1),
                  "device": device, "config": config.__dict__}
        if json_out:
            print_json(result)
        else:
            console.print(f"wrote {out} ({family}) in {result['seconds']:.0f} s")


@testbed_app.command("classifier")
def testbed_classifier(out: Annotated[Path, typer.Option(help="New folder for the concept classifier.")],
                       work: WorkOpt = Path("build/testbed"),
                       steps: Annotated[int, typer.Option(help="Training steps.")] = 2000,
                       seed: Annotated[int, typer.Option(help="Seed of data and training.")] = 0,
                       data_size: Annotated[int, typer.Option(help="Training rows of the dataset.")] = 8192,
                       json_out: JsonOpt = False) -> None:
    """Train the concept classifier on procedural members; report its accuracy on non-members."""
    with user_errors():
        from workbench.testbed.classifier import accuracy, save_classifier, train_classifier
        from workbench.testbed.dataset import build_dataset
        from workbench.testbed.training import LoopConfig

        if out.exists():
            raise WorkbenchError(f"{out} already exists; choose a new output folder")
        data = build_dataset(seed, data_size)
        model = train_classifier(data.images, data.labels, LoopConfig(steps=steps, lr=2e-3, seed=seed),
                                 work / f"classifier-{data.fingerprint()[:12]}", show_progress=not json_out)
        save_classifier(model, out)
        result = {"out": str(out), "non_member_accuracy": accuracy(model, data.non_member_images,
                                                                   data.non_member_labels)}
        if json_out:
            print_json(result)
        else:
            console.print(f"wrote {out}; accuracy on non-members: " +
                          ", ".join(f"{k} {v:.1%}" for k, v in result["non_member_accuracy"].items()))


@testbed_app.command("evaluate")
def testbed_evaluate(model: ModelArg,
                     classifier: Annotated[Path, typer.Option(help="Concept classifier folder.")] = Path(
                         "checkpoints/classifier"),
                     seeds: Annotated[int, typer.Option(help="Seeds per memorized caption.")] = 8,
                     seed: Annotated[int, typer.Option(help="Seed of the dataset the model was trained on.")] = 0,
                     data_size: Annotated[int, typer.Option(help="Training rows of that dataset.")] = 8192,
                     wen_guidance: Annotated[Optional[float], typer.Option(
                         help="CFG scale of Wen's sampling loop (default: the testbed's generation guidance; "
                              "7.5 is the reference code's).")] = None,
                     json_out: JsonOpt = False) -> None:
    """Check a testbed checkpoint against the testbed's bars (memorization, utility, detectors)."""
    with user_errors():
        from workbench.testbed.classifier import load_classifier
        from workbench.testbed.dataset import build_dataset
        from workbench.testbed.evaluate import EvalConfig, evaluate

        config = EvalConfig(seeds=seeds, **({} if wen_guidance is None else {"wen_guidance_scale": wen_guidance}))
        loaded, concepts = load_model(model, "cpu", "float32", "auto"), load_classifier(classifier)
        data = build_dataset(seed, data_size)
        report = with_status(json_out, "evaluating",
                             lambda advance: evaluate(loaded, data, concepts, config, advance))
        if json_out:
            print_json(report)
            return
        for key, value in report["summary"].items():
            console.print(f"{key}: {value}")


@testbed_app.command("describe")
def testbed_describe(out: Annotated[Path, typer.Option(help="Checkpoints folder to describe.")] = Path("checkpoints"),
                     seed: Annotated[int, typer.Option(help="Seed of the dataset.")] = 0,
                     data_size: Annotated[int, typer.Option(help="Training rows of the dataset.")] = 8192,
                     overwrite: Annotated[bool, typer.Option(help="Replace an existing testbed.json.")] = False,
                     json_out: JsonOpt = False) -> None:
    """Write testbed.json (ground truth) and the memorized training images beside the checkpoints."""
    with user_errors():
        from workbench.testbed.build import VARIANTS, variant_record
        from workbench.testbed.dataset import build_dataset
        from workbench.testbed.describe import describe
        from workbench.testbed.models import FAMILIES

        checkpoints = {family: family for family in FAMILIES if (out / family / "model_index.json").is_file()}
        variants = {name: variant_record(name) for name in VARIANTS if (out / name / "model_index.json").is_file()}
        description = describe(build_dataset(seed, data_size), out, checkpoints, "classifier", seed, data_size,
                               overwrite=overwrite, variants=variants)
        if json_out:
            print_json(description)
        else:
            console.print(f"wrote {out / 'testbed.json'}: {len(description['memorized'])} memorized captions, "
                          f"checkpoints {', '.join([*checkpoints, *variants]) or 'none yet'}")


def _widths(text: str) -> tuple[int, ...]:
    """'32, 96,192' -> (32, 96, 192); `check_unet_channels` judges the values."""
    try:
        return tuple(int(part) for part in comma_list(text) or ())
    except ValueError:
        raise WorkbenchError(f"--unet-channels must be comma-separated integers like 32,64,128 (got {text!r})")


def _fractions(text: str) -> tuple[float, ...]:
    """'0.1,0.25' -> (0.1, 0.25); each in (0, 1]."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or not all(0 < v <= 1 for v in values):
        raise WorkbenchError(f"--dose-fractions must be comma-separated numbers in (0, 1], like 0.1,0.25,0.5 "
                             f"(got {text!r})")
    return values


@testbed_app.command("localize")
def testbed_localize(model: ModelArg,
                     testbed: Annotated[Path, typer.Option(help="testbed.json with the held-out captions.")] = Path(
                         "checkpoints/testbed.json"),
                     methods: Annotated[str, typer.Option(help="Comma-separated: nemo, wanda, salun, ablation, "
                                                               "dose (NeMo's top-|z| fractions against random).")]
                     = "nemo,wanda,salun,ablation",
                     seeds: Annotated[int, typer.Option(help="Generations per caption.")] = 8,
                     sites: Annotated[str, typer.Option(help="NeMo's sites: official, all_value or blocks "
                                                                "(down.1,up.0).")] = "official",
                     legacy: Annotated[bool, typer.Option(help="NeMo as its reference code: timesteps[1], top-k on "
                                                               "raw activations, absolute token mean.")] = False,
                     search_score: Annotated[str, typer.Option(help="NeMo's search score: reference or "
                                                                    "consistency (see localize nemo).")]
                     = "reference",
                     nemo_steps: Annotated[int, typer.Option(help="Scheduler steps of NeMo's score (it reads the "
                                                                  "first timestep, the second with --legacy).")] = 50,
                     image_check: Annotated[Optional[float], typer.Option(
                         help="NeMo also requires each accepted set to take the image away (mean SSIM to the "
                              "un-blocked generations below this bound, e.g. 0.5; see localize nemo).")] = None,
                     image_seeds: Annotated[int, typer.Option(help="Generations per set for --image-check.")] = 4,
                     deactivation: Annotated[str, typer.Option(
                         help="How NeMo switches a neuron off: zero (the paper) or mean (its holdout mean; "
                              "ours).")] = "zero",
                     dose_fractions: Annotated[Optional[str], typer.Option(
                         help="Comma-separated fractions of the value neurons the dose section switches off "
                              "(default: 10, 25 and 50 %).")] = None,
                     wanda_skill_ratio: Annotated[Optional[float], typer.Option(
                         help="ConceptPrune's per-row fraction (default: the method's, 0.01).")] = None,
                     wanda_roles: Annotated[Optional[str], typer.Option(
                         help="Comma-separated roles of the Linear sites Wanda scores, e.g. cross_attn_value "
                              "(default: the method's, ffn_out).")] = None,
                     wanda_base: Annotated[str, typer.Option(
                         help="Wanda's base prompts: empty (\"\" per caption, ConceptPrune's memorization default) "
                              "or ordinary (held-out captions).")] = "empty",
                     salun_fraction: Annotated[Optional[float], typer.Option(
                         help="SalUn's share of salient weights (default: the method's, 0.5).")] = None,
                     salun_roles: Annotated[Optional[str], typer.Option(
                         help="Comma-separated roles SalUn ranks, e.g. cross_attn_value (default: every site).")]
                     = None,
                     json_out: JsonOpt = False) -> None:
    """Localization on the verbatim-memorized captions: removed? random controls? ordinary captions unchanged?"""
    with user_errors():
        from localization.detection import NemoConfig
        from localization.nemo import NemoLocalizationConfig
        from localization.nemo_image import ImageCheck
        from localization.salun import SalUnConfig
        from localization.wanda import WandaConfig
        from workbench.io import read_json
        from workbench.testbed.localization_report import (DOSE_FRACTIONS, ReportConfig, check_holdout,
                                                           check_methods, localization_report)

        report_config = ReportConfig(seeds=seeds, wanda_base=wanda_base)
        check = None if image_check is None else ImageCheck(image_check, image_seeds, steps=report_config.steps,
                                                             guidance_scale=report_config.guidance_scale)
        nemo = NemoLocalizationConfig(sites=sites, legacy=legacy, search_score=search_score, image_check=check,
                                      deactivation=deactivation, detection=NemoConfig(steps=nemo_steps))
        description = read_json(testbed, "testbed description")
        holdout = check_holdout(description.get("holdout_prompts") if isinstance(description, dict) else None,
                                report_config)
        fractions = _fractions(dose_fractions) if dose_fractions is not None else DOSE_FRACTIONS
        overrides = {"wanda": (WandaConfig, {"skill_ratio": wanda_skill_ratio, "roles": comma_list(wanda_roles)}),
                     "salun": (SalUnConfig, {"fraction": salun_fraction, "roles": comma_list(salun_roles)})}
        masks = {}
        for method, (config_class, values) in overrides.items():
            given = {name: value for name, value in values.items() if value is not None}
            if given:
                masks[method] = config_class(**given)
        chosen = comma_list(methods) or ()
        check_methods(chosen)
        loaded = load_model(model, "cpu", "float32", "auto")
        report = with_status(json_out, "localizing", lambda advance: localization_report(
            loaded, holdout, chosen, report_config, advance, nemo, fractions, masks))
        if json_out:
            print_json(report)
            return
        for method in chosen:
            console.print(f"[bold]{method}[/]: {report[method].get('summary', report[method].get('ranking', [])[:3])}")
