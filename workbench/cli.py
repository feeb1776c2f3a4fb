"""The `workbench` command line: a thin typer layer over the Python API.

Every command that reports something has `--json`. Expected failures print one line and exit 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                      ("DIFFUSERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
    os.environ.setdefault(_name, _value)  # offline by design; library chatter off (before they import)

import typer  # noqa: E402
from rich.table import Table  # noqa: E402

from workbench.cli_support import (DeviceOpt, DtypeOpt, FamilyOpt, JsonOpt, ModelArg, app, console,  # noqa: E402
                                   load_model, print_json, user_errors)
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.localize_commands import localize_app  # noqa: E402
from workbench.testbed.commands import testbed_app  # noqa: E402

app.add_typer(testbed_app, name="testbed")
app.add_typer(localize_app, name="localize")


@app.command()
def inspect(model: ModelArg, json_out: JsonOpt = False, device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32",
            family: FamilyOpt = "auto") -> None:
    """Family, sites per role and neurons per block of a model's denoiser."""
    with user_errors():
        loaded = load_model(model, device, dtype, family)
        graph = loaded.graph
        summary = graph.summary()
        if json_out:
            sites = [{k: v for k, v in s.to_json().items() if k != "weight_shape"} for s in graph.sites]
            print_json({"model": str(model), "pipeline": type(loaded.pipeline).__name__, **summary, "sites": sites})
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
    with user_errors():
        from workbench.io import check_writable

        check_writable(out, overwrite=overwrite)
        loaded = load_model(model, "cpu", "float32", family)
        loaded.graph.save(out, overwrite=overwrite)
        edges: dict[str, int] = {}
        for _, _, kind in loaded.graph.nx.edges(data="kind"):
            edges[kind] = edges.get(kind, 0) + 1
        result = {"out": str(out), "sites": len(loaded.graph.sites), "edges": edges}
        if json_out:
            print_json(result)
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
    with user_errors():
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
        loaded = load_model(model, device, dtype, family)
        context = ablate_neurons(loaded, neurons) if neurons is not None else nullcontext()
        with context, console.status("generating", spinner="dots") if not json_out else nullcontext():
            images = run_generate(loaded, prompt, seed=seed, steps=steps, guidance_scale=guidance)
        for image, path in zip(images, paths):
            save_image(image, path, overwrite=overwrite)
        result = {"images": [{"prompt": p, "seed": seed + i, "path": str(path)}
                             for i, (p, path) in enumerate(zip(prompt, paths))],
                  "ablated_neurons": len(neurons) if neurons is not None else 0}
        if json_out:
            print_json(result)
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
           wen_first_step: Annotated[bool, typer.Option(
               "--wen-first-step", help="Wen magnitude at the first step only (cheap mode; sampling stops there).")]
           = False,
           wen_guidance: Annotated[Optional[float], typer.Option(
               help="CFG scale of Wen's sampling loop (default 7.5, the paper's: SD's usual guidance; give the "
                    "guidance your model is sampled at).")] = None,
           json_out: JsonOpt = False, device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32",
           family: FamilyOpt = "auto") -> None:
    """Score prompts for memorization (NeMo noise consistency, Wen et al. noise magnitude); give verdicts."""
    with user_errors():
        from dataclasses import replace

        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from localization.detection import NemoConfig, Thresholds, WenConfig, calibrate, read_prompts
        from localization.detection import detect as run_detect

        targets = read_prompts(prompts)
        holdout = read_prompts(calibration) if calibration is not None else None
        nemo = NemoConfig(**{k: v for k, v in (("n_seeds", seeds), ("steps", steps)) if v is not None})
        wen_options = {k: v for k, v in (("generations", seeds), ("steps", steps), ("guidance_scale", wen_guidance))
                       if v is not None}
        wen = WenConfig.first_step(**wen_options) if wen_first_step else WenConfig(**wen_options)
        loaded = load_model(model, device, dtype, family)
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
            print_json({"model": str(model), "thresholds": thresholds.to_json(), "verdict_rule": rule,
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
def demo(out: Annotated[Path, typer.Option(help="Folder for the demo's runs (each in a new runs/<time>/).")]
         = Path("demo-output"),
         checkpoints: Annotated[Path, typer.Option(help="Folder with testbed.json and the shipped checkpoints.")]
         = Path("checkpoints"),
         seeds: Annotated[int, typer.Option(help="Generations per caption.")] = 4,
         calibration: Annotated[int, typer.Option(help="Held-out captions to calibrate the thresholds on.")] = 16,
         ordinary: Annotated[int, typer.Option(help="Further held-out captions to score and generate.")] = 8,
         memorized: Annotated[Optional[int], typer.Option(help="Memorized captions to show (default all).")] = None,
         localize: Annotated[int, typer.Option(help="Detected verbatim captions to localize with NeMo and "
                                                    "switch off.")] = 3,
         json_out: JsonOpt = False) -> None:
    """The main job: detect, localize (NeMo) and switch off memorization in the shipped U-Net; HTML page."""
    with user_errors():
        from workbench.demo import DemoConfig, print_summary, run_demo

        config = DemoConfig(seeds=seeds, calibration=calibration, ordinary=ordinary, memorized=memorized,
                            localize=localize)
        summary = run_demo(checkpoints, out, config, console=None if json_out else console)
        if json_out:
            print_json(summary)
        else:
            print_summary(summary, console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
