"""Time `NeuronGraph.from_config` for real-size denoisers, built from configs alone (meta device).

For each config in `bench/configs/` this measures, as the median of `--reps` runs:

* the parameter count of the meta model against the published size (a check that the config is right),
* `NeuronGraph.from_config(class_name, config)`: meta instantiation + the reference forward on meta
  that gives execution order + sites, edges and the networkx graph,
  (the first run is also reported: in a fresh process it pays diffusers' lazy imports),
* a JSON round trip: `graph.save(path)` and `NeuronGraph.load(path)` (checked to give the same JSON).

Run:  .venv/bin/python bench/graph_build.py [--reps 5] [--json results.json | --json -]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import diffusers
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from report import emit_json  # bench/report.py (scripts run from bench/ on sys.path)
from workbench.graph import NeuronGraph

CONFIGS = Path(__file__).resolve().parent / "configs"
# Published parameter counts of the denoisers the configs reproduce.
PUBLISHED = {"sd15_unet": 859_520_964, "sdxl_unet": 2_567_463_684,
             "pixart_alpha_1024": 611_349_152, "sd3_medium": 2_028_328_000}
TARGET_BUILD_S = 10.0
EDGE_KINDS = ("flow", "residual", "skip", "text", "time")


def timed(fn: Callable[[], Any], reps: int) -> tuple[list[float], Any]:
    """Wall times of `reps` calls of `fn`, and the last result."""
    times, result = [], None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def meta_params(config: dict[str, Any]) -> int:
    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    return sum(p.numel() for p in model.parameters())


def bench_config(name: str, config: dict[str, Any], reps: int, workdir: Path) -> dict[str, Any]:
    class_name = config["_class_name"]
    builds, graph = timed(lambda: NeuronGraph.from_config(class_name, config), reps)
    path = workdir / f"{name}.graph.json"
    saves, _ = timed(lambda: graph.save(path, overwrite=True), reps)
    loads, loaded = timed(lambda: NeuronGraph.load(path), reps)
    if loaded.to_json() != graph.to_json():
        raise RuntimeError(f"{name}: the graph changed in a JSON round trip")
    summary = graph.summary()
    edges = Counter(kind for _, _, kind in graph.nx.edges(data="kind"))
    params = meta_params(config)
    return {"name": name, "class": class_name, "params": params, "published_params": PUBLISHED.get(name),
            "sites": summary["sites"], "neurons": summary["neurons"],
            "edges": {kind: edges.get(kind, 0) for kind in EDGE_KINDS}, "order_source": graph.meta["order_source"],
            "build_s": statistics.median(builds), "first_build_s": builds[0],
            "save_s": statistics.median(saves), "load_s": statistics.median(loads), "json_bytes": path.stat().st_size}


def table(results: list[dict[str, Any]]) -> Table:
    out = Table(title=f"NeuronGraph.from_config (meta device), median; target < {TARGET_BUILD_S:.0f} s")
    for column in ("config", "params", "vs published", "sites", "neurons", *EDGE_KINDS,
                   "build s", "1st build s", "save s", "load s", "JSON MB"):
        out.add_column(column, justify="left" if column == "config" else "right", no_wrap=True)
    for r in results:
        published = r["published_params"]
        match = "n/a" if published is None else "exact" if r["params"] == published else \
            f"{(r['params'] - published) / published:+.4%}"
        out.add_row(r["name"], f"{r['params']:,}", match, str(r["sites"]), f"{r['neurons']:,}",
                    *(str(r["edges"][k]) for k in EDGE_KINDS), f"{r['build_s']:.2f}", f"{r['first_build_s']:.2f}", f"{r['save_s']:.3f}",
                    f"{r['load_s']:.3f}", f"{r['json_bytes'] / 1e6:.2f}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="runs per measurement (median is reported)")
    parser.add_argument("--configs", nargs="*", default=sorted(p.stem for p in CONFIGS.glob("*.json")),
                        help="config names in bench/configs (default: all)")
    parser.add_argument("--json", metavar="PATH", help="write results as JSON to PATH ('-' for stdout)")
    args = parser.parse_args(argv)
    stream = sys.stderr if args.json == "-" else sys.stdout
    console = Console(file=stream, width=None if stream.isatty() else 160)  # no wrapping when piped
    results = []
    with tempfile.TemporaryDirectory() as tmp, Progress(console=console, transient=True) as progress:
        task = progress.add_task("building graphs", total=len(args.configs))
        for name in args.configs:
            progress.update(task, description=f"building {name}")
            config = json.loads((CONFIGS / f"{name}.json").read_text())
            results.append(bench_config(name, config, args.reps, Path(tmp)))
            progress.advance(task)
    console.print(table(results))
    slowest = max(results, key=lambda r: r["build_s"])
    verdict = "meets" if slowest["build_s"] < TARGET_BUILD_S else "MISSES"
    console.print(f"slowest build: {slowest['name']} {slowest['build_s']:.2f} s ({verdict} the < {TARGET_BUILD_S:.0f} s "
                  f"target); torch {torch.__version__}, diffusers {diffusers.__version__}, "
                  f"{torch.get_num_threads()} threads")
    payload = {"benchmark": "graph_build", "reps": args.reps, "torch": torch.__version__,
               "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
               "target_build_s": TARGET_BUILD_S, "results": results}
    emit_json(payload, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
