"""The `workbench` command line: a thin typer layer over the Python API.

Every command that reports something has `--json`. Expected failures print one line and exit 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                      ("DIFFUSERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
    os.environ.setdefault(_name, _value)  # offline by design; library chatter off (before they import)

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from workbench.errors import WorkbenchError  # noqa: E402

app = typer.Typer(help="Find, remove and audit what a text-to-image diffusion model stores.",
                  pretty_exceptions_enable=False, no_args_is_help=True, add_completion=False)
console = Console()
_debug = {"on": False}

ModelArg = Annotated[Path, typer.Argument(help="Local diffusers pipeline folder (with model_index.json).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="float32, float16 or bfloat16.")]
FamilyOpt = Annotated[str, typer.Option(help="Denoiser family: auto, unet, dit, mmdit or generic.")]


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _debug["on"] = debug


@contextmanager
def _user_errors() -> Iterator[None]:
    """Expected failures become one line on stderr and exit code 2."""
    try:
        yield
    except (WorkbenchError, FileExistsError, FileNotFoundError, PermissionError) as err:
        if _debug["on"]:
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        raise typer.Exit(2) from None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _load(model: Path, device: str, dtype: str, family: str):
    import workbench

    return workbench.load(model, device=device, dtype=dtype, family=family)


@app.command()
def inspect(model: ModelArg, json_out: JsonOpt = False, device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32",
            family: FamilyOpt = "auto") -> None:
    """Family, sites per role and neurons per block of a model's denoiser."""
    with _user_errors():
        loaded = _load(model, device, dtype, family)
        graph = loaded.graph
        summary = graph.summary()
        if json_out:
            sites = [{k: v for k, v in s.to_json().items() if k != "weight_shape"} for s in graph.sites]
            _print_json({"model": str(model), "pipeline": type(loaded.pipeline).__name__, **summary, "sites": sites})
            return
        console.print(f"[bold]{model}[/]: {type(loaded.pipeline).__name__}, family [bold]{summary['family']}[/] "
                      f"({summary['denoiser_class']}), {summary['sites']} sites, {summary['neurons']:,} neurons")
        for title, rows in (("role", summary["roles"]), ("block", summary["blocks"])):
            table = Table(title=f"sites per {title}")
            for column in (title, "sites", "neurons"):
                table.add_column(column, justify="left" if column == title else "right")
            for key, counts in rows.items():
                table.add_row(key, str(counts["sites"]), f"{counts['neurons']:,}")
            console.print(table)


@app.command()
def graph(model: ModelArg, out: Annotated[Path, typer.Option(help="Where to write the graph JSON.")],
          overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
          json_out: JsonOpt = False, family: FamilyOpt = "auto") -> None:
    """Write the neuron graph (sites, data-flow edges) as JSON."""
    with _user_errors():
        from workbench.io import check_writable

        check_writable(out, overwrite=overwrite)
        loaded = _load(model, "cpu", "float32", family)
        loaded.graph.save(out, overwrite=overwrite)
        edges: dict[str, int] = {}
        for _, _, kind in loaded.graph.nx.edges(data="kind"):
            edges[kind] = edges.get(kind, 0) + 1
        result = {"out": str(out), "sites": len(loaded.graph.sites), "edges": edges}
        if json_out:
            _print_json(result)
        else:
            console.print(f"wrote {out}: {result['sites']} sites, edges {edges}")


@app.command()
def generate(model: ModelArg,
             prompt: Annotated[list[str], typer.Option("--prompt", help="Prompt (repeat for several).")],
             out: Annotated[Path, typer.Option(help="PNG path; with several prompts, NAME-i.png.")],
             seed: Annotated[int, typer.Option(help="Seed of the first prompt (prompt i uses seed+i).")] = 0,
             steps: Annotated[Optional[int], typer.Option(help="Denoising steps (pipeline default if unset).")] = None,
             guidance: Annotated[Optional[float], typer.Option(help="CFG scale (pipeline default if unset).")] = None,
             ablate: Annotated[Optional[Path], typer.Option(help="NeuronSet JSON to ablate while generating.")] = None,
             overwrite: Annotated[bool, typer.Option(help="Replace existing images.")] = False,
             json_out: JsonOpt = False, device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32",
             family: FamilyOpt = "auto") -> None:
    """Generate images, optionally with a neuron set ablated."""
    with _user_errors():
        from contextlib import nullcontext

        from workbench.intervene import ablate as ablate_neurons
        from workbench.io import check_writable
        from workbench.neurons import NeuronSet
        from workbench.sampling import generate as run_generate, save_image

        if out.suffix.lower() != ".png":
            raise WorkbenchError(f"output {out} must end in .png")
        paths = [out] if len(prompt) == 1 else [out.with_name(f"{out.stem}-{i}.png") for i in range(len(prompt))]
        for path in paths:
            check_writable(path, overwrite=overwrite)
        neurons = NeuronSet.load(ablate) if ablate is not None else None
        loaded = _load(model, device, dtype, family)
        context = ablate_neurons(loaded, neurons) if neurons is not None else nullcontext()
        with context, console.status("generating", spinner="dots") if not json_out else nullcontext():
            images = run_generate(loaded, prompt, seed=seed, steps=steps, guidance_scale=guidance)
        for image, path in zip(images, paths):
            save_image(image, path, overwrite=overwrite)
        result = {"images": [{"prompt": p, "seed": seed + i, "path": str(path)}
                             for i, (p, path) in enumerate(zip(prompt, paths))],
                  "ablated_neurons": len(neurons) if neurons is not None else 0}
        if json_out:
            _print_json(result)
        else:
            for item in result["images"]:
                console.print(f"wrote {item['path']}  (seed {item['seed']}): {item['prompt']}")


@app.command()
def detect(model: ModelArg,
           prompts: Annotated[Path, typer.Option("--prompts",
                                                 help="Text file, one prompt per line (blank lines ignored).")],
           calibration: Annotated[Optional[Path], typer.Option(
               help="Non-memorized prompts, one per line: each threshold = mean + 1 std of its scores.")] = None,
           threshold_nemo: Annotated[Optional[float], typer.Option(
               help="NeMo noise-consistency threshold (overrides --calibration's).")] = None,
           threshold_wen: Annotated[Optional[float], typer.Option(
               help="Wen text-conditional noise magnitude threshold (overrides --calibration's).")] = None,
           seeds: Annotated[Optional[int], typer.Option(
               help="Seeds per prompt for both detectors (default: the papers', NeMo 10, Wen 4).")] = None,
           steps: Annotated[Optional[int], typer.Option(
               help="Scheduler steps for both detectors (default 50).")] = None,
           json_out: JsonOpt = False, device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32",
           family: FamilyOpt = "auto") -> None:
    """Score prompts for memorization (NeMo noise consistency, Wen et al. noise magnitude); give verdicts."""
    with _user_errors():
        from dataclasses import replace

        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from localization.detection import NemoConfig, Thresholds, WenConfig, calibrate, read_prompts
        from localization.detection import detect as run_detect

        targets = read_prompts(prompts)
        holdout = read_prompts(calibration) if calibration is not None else None
        nemo = NemoConfig(**{k: v for k, v in (("n_seeds", seeds), ("steps", steps)) if v is not None})
        wen = WenConfig(**{k: v for k, v in (("generations", seeds), ("steps", steps)) if v is not None})
        loaded = _load(model, device, dtype, family)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, disable=json_out, transient=True) as progress:
            def run(items: list[str], what: str, limits: Thresholds) -> list:
                task = progress.add_task(what, total=len(items))
                results = []
                for result in run_detect(loaded, items, nemo=nemo, wen=wen, thresholds=limits):
                    results.append(result)
                    progress.advance(task)
                return results

            given = {k: v for k, v in (("nemo", threshold_nemo), ("wen", threshold_wen)) if v is not None}
            thresholds = Thresholds(**given, source="given") if given else Thresholds()
            if holdout is not None and len(given) < 2:  # explicit thresholds win over calibrated ones
                calibrated = calibrate(run(holdout, "calibrating", Thresholds()))
                source = f"{calibrated.source}; {', '.join(given)} given" if given else calibrated.source
                thresholds = replace(calibrated, **given, source=source)
            results = run(targets, "detecting", thresholds)
        rule = "memorized if any detector with a threshold flags it (score > threshold)"
        if json_out:
            _print_json({"model": str(model), "thresholds": thresholds.to_json(), "verdict_rule": rule,
                         "prompts": [r.to_json() for r in results]})
            return
        nemo_limit, wen_limit = ("no threshold" if v is None else f"{v:.4g}" for v in (thresholds.nemo, thresholds.wen))
        console.print(f"thresholds: NeMo {nemo_limit}, Wen {wen_limit} ({thresholds.source})", highlight=False)
        table = Table()
        for column in ("prompt", "NeMo", "NeMo verdict", "Wen", "Wen verdict", "verdict"):
            table.add_column(column, justify="left" if column == "prompt" else "right")
        verdict = {True: "[red]memorized[/]", False: "ok", None: "-"}
        for r in results:
            table.add_row(escape(r.prompt), f"{r.nemo.score:.4f}", verdict[r.nemo.memorized],
                          f"{r.wen.magnitude:.4f}", verdict[r.wen.memorized], verdict[r.memorized])
        console.print(table)
        console.print(f"verdict: {rule}")


@app.command()
def demo(out: Annotated[Path, typer.Option(help="Folder for the demo's model and runs.")] = Path("demo-output"),
         json_out: JsonOpt = False) -> None:
    """The main job on what exists now: inspect, record, ablate and generate on a tiny U-Net."""
    with _user_errors():
        from workbench.demo import print_summary, run_demo

        summary = run_demo(out, console=None if json_out else console)
        if json_out:
            _print_json(summary)
        else:
            print_summary(summary, console)


testbed_app = typer.Typer(help="The project's own small models with planted, known memorization.",
                          no_args_is_help=True)
app.add_typer(testbed_app, name="testbed")
WorkOpt = Annotated[Path, typer.Option(help="Folder for resumable training state.")]


@testbed_app.command("train")
def testbed_train(family: Annotated[str, typer.Argument(help="unet, dit or mmdit.")],
                  out: Annotated[Path, typer.Option(help="New folder for the trained diffusers pipeline.")],
                  work: WorkOpt = Path("build/testbed"),
                  steps: Annotated[int, typer.Option(help="Denoiser training steps.")] = 4000,
                  vae_steps: Annotated[int, typer.Option(help="VAE training steps (the VAE is shared).")] = 1500,
                  lr: Annotated[float, typer.Option(help="AdamW learning rate of the denoiser.")] = 1e-3,
                  seed: Annotated[int, typer.Option(help="Seed of data, initialisation and batches.")] = 0,
                  data_size: Annotated[int, typer.Option(help="Training rows (procedural + private).")] = 8192,
                  json_out: JsonOpt = False) -> None:
    """Train a testbed checkpoint from scratch (deterministic; rerun the same command to resume)."""
    with _user_errors():
        import time

        from workbench.testbed.build import BuildConfig, build_checkpoint
        from workbench.testbed.models import FAMILIES

        if family not in FAMILIES:
            raise WorkbenchError(f"unknown testbed family {family!r}; use one of {', '.join(FAMILIES)}")
        config = BuildConfig(family, steps=steps, lr=lr, vae_steps=vae_steps, data_size=data_size, seed=seed)
        start = time.perf_counter()
        build_checkpoint(config, out, work, show_progress=not json_out)
        result = {"out": str(out), "family": family, "seconds": round(time.perf_counter() - start, 1),
                  "config": config.__dict__}
        if json_out:
            _print_json(result)
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
    with _user_errors():
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
            _print_json(result)
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
                     json_out: JsonOpt = False) -> None:
    """Check a testbed checkpoint against the testbed's bars (memorization, utility, detectors)."""
    with _user_errors():
        from rich.progress import Progress

        from workbench.testbed.classifier import load_classifier
        from workbench.testbed.dataset import build_dataset
        from workbench.testbed.evaluate import EvalConfig, evaluate

        loaded, concepts = _load(model, "cpu", "float32", "auto"), load_classifier(classifier)
        data = build_dataset(seed, data_size)
        with Progress(console=console, transient=True, disable=json_out) as progress:
            task = progress.add_task("evaluating", total=None)
            report = evaluate(loaded, data, concepts, EvalConfig(seeds=seeds),
                              lambda text: progress.update(task, description=text))
        if json_out:
            _print_json(report)
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
    with _user_errors():
        from workbench.testbed.dataset import build_dataset
        from workbench.testbed.describe import describe
        from workbench.testbed.models import FAMILIES

        checkpoints = {family: family for family in FAMILIES if (out / family / "model_index.json").is_file()}
        description = describe(build_dataset(seed, data_size), out, checkpoints, "classifier", seed, data_size,
                               overwrite=overwrite)
        if json_out:
            _print_json(description)
        else:
            console.print(f"wrote {out / 'testbed.json'}: {len(description['memorized'])} memorized captions, "
                          f"checkpoints {', '.join(checkpoints) or 'none yet'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
