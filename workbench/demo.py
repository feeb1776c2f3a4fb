"""The main job (`make demo`): memorization in the shipped U-Net, found, localized, switched off, shown.

On the shipped testbed U-Net (`checkpoints/unet`, ground truth in `checkpoints/testbed.json`) the demo
calibrates both detectors (NeMo noise consistency, Wen et al.'s noise magnitude; mean + 1 std) on
held-out ordinary captions, scores the memorized captions and other ordinary captions, generates each
caption over several seeds and finds every generation's nearest training image (SSIM and pixel L2).
Then NeMo localizes the first detected verbatim captions, their neurons are switched off and the
captions generated again. A self-contained HTML page shows generations next to the training images,
before and after.
"""

from __future__ import annotations

import html
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

import workbench
from localization.detection import (Detection, ReplicationConfig, Thresholds, WenConfig, calibrate, detect,
                                   nearest_training_images)
from localization.localize import localize
from workbench.errors import WorkbenchError
from workbench.html_page import figure, page, table as html_table
from workbench.io import atomic_write_json, atomic_write_text, read_json, read_rgb_images
from workbench.sampling import generate
from workbench.testbed.classifier import images_to_unit
from workbench.testbed.dataset import build_dataset

REPLICATION_BAR = 0.85  # SSIM at which a generation counts as a copy of a training image (issue 3's bar)
REPLICATION = ReplicationConfig(ssim_candidates=256)
"""SSIM against each generation's 256 most correlated training images: measured against the exact search over
all 6,300, the same SSIM for 110 of 112 generations (largest difference 0.02), 4× faster demo."""
WEN = WenConfig.first_step()
"""Wen et al.'s first-step magnitude: on the testbed U-Net it separates memorized from ordinary captions
(ROC AUC 0.95) where the magnitude averaged over all 50 steps is inverted (0.07), likely because ordinary
testbed captions name every attribute of a scene, keeping their conditional prediction far from the
unconditional one all the way down, while a memorized photo is soon reproduced by both branches alike."""


@dataclass(frozen=True)
class DemoConfig:
    """How much the demo does; the defaults take a few minutes on two CPU cores."""

    seeds: int = 4  # generations per caption
    calibration: int = 16  # held-out captions the thresholds are calibrated on
    ordinary: int = 8  # further held-out captions scored and generated
    memorized: int | None = None  # memorized captions to show; None = all
    localize: int = 3  # detected verbatim captions NeMo localizes and switches off

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.calibration < 2 or self.ordinary < 1 or (self.memorized or 1) < 1 \
                or self.localize < 0:
            raise WorkbenchError("the demo needs seeds >= 1, calibration >= 2, ordinary >= 1, memorized >= 1 "
                                 "and localize >= 0")


def read_testbed(checkpoints: Path) -> dict[str, Any]:
    """`checkpoints/testbed.json`, checked to list a U-Net checkpoint that exists."""
    if not (checkpoints / "testbed.json").is_file():
        raise WorkbenchError(f"{checkpoints / 'testbed.json'} not found; run from the repository root or pass "
                             "--checkpoints FOLDER")
    testbed = read_json(checkpoints / "testbed.json", "testbed description")
    unet = testbed.get("checkpoints", {}).get("unet")
    if unet is None or not (checkpoints / unet).is_dir():
        raise WorkbenchError(f"{checkpoints / 'testbed.json'} lists no U-Net checkpoint; train one with "
                             "`workbench testbed train unet` and list it with `workbench testbed describe`")
    return testbed


def training_images(testbed: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """Every distinct training image (in [0, 1]) and its id, regenerated and checked by fingerprint."""
    spec = testbed["data"]
    data = build_dataset(spec["seed"], spec["size"])
    if data.fingerprint() != spec["fingerprint"]:
        raise WorkbenchError("the regenerated training data does not match testbed.json's fingerprint; "
                             "use the workbench version the checkpoints were built with")
    _, first = np.unique(np.array(data.ids), return_index=True)
    first = np.sort(first)
    return images_to_unit(data.images[first]), [data.ids[i] for i in first]


def caption_rows(testbed: dict[str, Any], config: DemoConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """The captions to show (memorized, then ordinary) and the calibration captions."""
    memorized = testbed["memorized"][:config.memorized]
    holdout = testbed["holdout_prompts"]
    if len(holdout) < config.calibration + config.ordinary:
        raise WorkbenchError(f"testbed.json has {len(holdout)} held-out prompts; ask for at most that many "
                             "calibration + ordinary captions")
    rows = [{"caption": m["caption"], "kind": m["kind"], "image": m["image"]} for m in memorized]
    rows += [{"caption": p, "kind": "ordinary", "image": None}
             for p in holdout[config.calibration:config.calibration + config.ordinary]]
    return rows, holdout[:config.calibration]


def new_run_folder(out: Path) -> Path:
    """A new, empty `out/runs/<time>[-n]/`: earlier runs are never touched."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        run_dir = out / "runs" / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise WorkbenchError(f"could not create a new run folder under {out / 'runs'}; clean it up or pass --out")


def run_demo(checkpoints: Path, out: Path, config: DemoConfig = DemoConfig(),
             console: Console | None = None) -> dict[str, Any]:
    """Run the demo; write `page.html` and `summary.json` to a new `out/runs/<time>/`; return the summary."""
    testbed = read_testbed(checkpoints)
    rows, calibration = caption_rows(testbed, config)
    run_dir = new_run_folder(out)
    progress = Progress(console=console, transient=True) if console else nullcontext()
    with progress:
        task = progress.add_task("demo", total=len(calibration) + 2 * len(rows) + 4 + 2 * config.localize) \
            if console else None
        advance: Callable[[str], None] = ((lambda text: progress.update(task, advance=1, description=text))
                                          if console else (lambda text: None))
        model = workbench.load(checkpoints / testbed["checkpoints"]["unet"])
        advance("regenerating the training images")
        training, ids = training_images(testbed)
        calibrated = []
        for result in detect(model, calibration, wen=WEN):
            calibrated.append(result)
            advance(f"calibrating: {result.prompt}")
        thresholds = calibrate(calibrated)
        detections: list[Detection] = []
        for result in detect(model, [r["caption"] for r in rows], wen=WEN, thresholds=thresholds):
            detections.append(result)
            advance(f"detecting: {result.prompt}")
        generation = testbed["generation"]
        for row, detection in zip(rows, detections):
            advance(f"generating: {row['caption']}")
            images = generate(model, [row["caption"]] * config.seeds, seed=0, steps=generation["steps"],
                              guidance_scale=generation["guidance"])
            nearest = nearest_training_images(images, training, REPLICATION)
            row.update(images=images, nearest=nearest, detection=detection)
        targets = [r for r in rows if r["kind"] == "verbatim" and r["detection"].memorized][:config.localize]
        if targets:
            located = localize(model, "nemo", [r["caption"] for r in targets], holdout=calibration,
                               threshold=thresholds.nemo, advance=lambda text: advance(f"NeMo: {text}"))
            for row, neurons, result in zip(targets, located.per_prompt(), located.results):
                advance(f"generating without its neurons: {row['caption']}")
                with located.deactivate(model, neurons):
                    after = generate(model, [row["caption"]] * config.seeds, seed=0, steps=generation["steps"],
                                     guidance_scale=generation["guidance"])
                row.update(after=after, nemo=result,
                           after_nearest=nearest_training_images(after, training, REPLICATION))
    summary = summarize(rows, thresholds, testbed, config, checkpoints, run_dir, ids)
    atomic_write_text(run_dir / "page.html", html_report(rows, training, checkpoints, summary))
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def summarize(rows: list[dict[str, Any]], thresholds: Thresholds, testbed: dict[str, Any], config: DemoConfig,
              checkpoints: Path, run_dir: Path, ids: list[str]) -> dict[str, Any]:
    captions = []
    for row in rows:
        nearest, detection = row["nearest"], row["detection"]
        captions.append({
            "caption": row["caption"], "kind": row["kind"],
            "replication_ssim": nearest.ssim.tolist(), "nearest_training_id": [ids[i] for i in nearest.ssim_index],
            "replication_l2": nearest.l2.tolist(),
            "seeds_over_bar": int((nearest.ssim >= REPLICATION_BAR).sum()),
            "nemo": detection.nemo.score, "nemo_memorized": detection.nemo.memorized,
            "wen": detection.wen.magnitude, "wen_memorized": detection.wen.memorized,
            "memorized_verdict": detection.memorized})
        if "nemo" in row:
            captions[-1]["nemo_localization"] = {
                "neurons": row["nemo"]["neurons"], "count": row["nemo"]["count"],
                "refined_score": row["nemo"]["refined_score"],
                "replication_ssim_after": row["after_nearest"].ssim.tolist()}
    memorized = [c for c in captions if c["kind"] != "ordinary"]
    ordinary = [c for c in captions if c["kind"] == "ordinary"]
    flagged = lambda group: sum(bool(c["memorized_verdict"]) for c in group)  # noqa: E731
    return {
        "model": str(checkpoints / testbed["checkpoints"]["unet"]), "run": str(run_dir),
        "config": asdict(config), "generation": testbed["generation"], "replication_bar": REPLICATION_BAR,
        "thresholds": thresholds.to_json(),
        "flagged": {"memorized": f"{flagged(memorized)}/{len(memorized)}",
                    "ordinary": f"{flagged(ordinary)}/{len(ordinary)}"},
        "captions": captions,
        "files": {"page": str(run_dir / "page.html"), "summary": str(run_dir / "summary.json")},
    }


def _verdict_html(flag: bool | None) -> str:
    return {True: '<span class="bad">memorized</span>', False: '<span class="good">ok</span>', None: "-"}[flag]


def html_report(rows: list[dict[str, Any]], training: torch.Tensor, checkpoints: Path,
                summary: dict[str, Any]) -> str:
    """The page: per caption, its training image, the generations with their nearest-image SSIM, verdicts."""
    thresholds = summary["thresholds"]
    intro = (f"<p>Model <code>{html.escape(summary['model'])}</code>; {summary['config']['seeds']} seeds per "
             f"caption, {summary['generation']['steps']} steps, guidance {summary['generation']['guidance']}. "
             f"Thresholds (mean + 1 std over {summary['config']['calibration']} held-out captions): NeMo "
             f"{thresholds['nemo']:.4f}, Wen (first step) {thresholds['wen']:.4f}. A generation replicates a training image "
             f"when its SSIM to it is at least {summary['replication_bar']}.</p>")
    body = []
    for row, caption in zip(rows, summary["captions"]):
        own = ""
        if row["image"]:
            own = figure(read_rgb_images([checkpoints / row["image"]], "training image")[0], "training image")
        generated = "".join(
            figure(image, f"SSIM {ssim:.2f}" + (" copy" if ssim >= REPLICATION_BAR else ""))
            for image, ssim in zip(row["images"], caption["replication_ssim"]))
        nearest = "".join(figure(training[i], "nearest") for i in row["nearest"].ssim_index[:1])
        scores = (f"NeMo {caption['nemo']:.3f} {_verdict_html(caption['nemo_memorized'])}<br>"
                  f"Wen {caption['wen']:.3f} {_verdict_html(caption['wen_memorized'])}")
        after = ""
        if "after" in row:
            found = caption["nemo_localization"]
            after = (f"{found['count']} neuron(s) off<br>" + "".join(
                figure(image, f"SSIM {ssim:.2f}") for image, ssim in zip(row["after"], found["replication_ssim_after"])))
        body.append([f"{html.escape(caption['caption'])}<br><i>{caption['kind']}</i>", own, generated,
                     nearest, scores, _verdict_html(caption["memorized_verdict"]), after])
    return page("workbench: memorization in the shipped U-Net",
                [intro, html_table(["caption", "training image", "generations (nearest-training SSIM)",
                               "nearest to seed 0", "detectors", "verdict", "after NeMo (neurons off)"], body)])


def print_summary(summary: dict[str, Any], console: Console) -> None:
    thresholds = summary["thresholds"]
    console.print(f"[bold]model[/] {summary['model']}; thresholds NeMo {thresholds['nemo']:.4f}, "
                  f"Wen {thresholds['wen']:.4f} ({thresholds['source']})", highlight=False)
    table = Table(title=f"replication (nearest training image, SSIM ≥ {summary['replication_bar']} = copy) "
                         "and detector verdicts")
    for column in ("caption", "kind", "mean SSIM", "copies", "NeMo", "Wen", "verdict"):
        table.add_column(column, justify="left" if column in ("caption", "kind") else "right")
    verdict = {True: "[red]memorized[/]", False: "ok", None: "-"}
    for c in summary["captions"]:
        table.add_row(escape(c["caption"]), c["kind"], f"{sum(c['replication_ssim']) / len(c['replication_ssim']):.2f}",
                       f"{c['seeds_over_bar']}/{len(c['replication_ssim'])}", f"{c['nemo']:.3f}", f"{c['wen']:.3f}",
                       verdict[c["memorized_verdict"]])
    console.print(table)
    for c in summary["captions"]:
        if "nemo_localization" in c:
            found = c["nemo_localization"]
            after = sum(found["replication_ssim_after"]) / len(found["replication_ssim_after"])
            console.print(f"NeMo: {escape(c['caption'])}: {found['count']} neuron(s) off → mean SSIM "
                          f"{sum(c['replication_ssim']) / len(c['replication_ssim']):.2f} → {after:.2f}")
    console.print(f"flagged as memorized: {summary['flagged']['memorized']} memorized captions, "
                  f"{summary['flagged']['ordinary']} ordinary captions")
    console.print(f"page: {summary['files']['page']}  (open it in a browser); summary: {summary['files']['summary']}")
