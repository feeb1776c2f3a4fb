"""Scale-out with accelerate: under `accelerate launch` the same command splits its prompts over processes.

Each process takes every `count`-th prompt (its shard); per-prompt results are gathered and put back
in prompt order, and running statistics are merged with Chan et al.'s pairwise formulas
(`RunningStats.combine`), so a sharded run finds what a single process finds. With one process
(plain `python` / `workbench`) nothing is gathered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from workbench.stats import RunningStats

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Shard:
    """Process `index` of `count`; `gather` collects a picklable list from every process, in process order."""

    index: int = 0
    count: int = 1
    gather: Callable[[list], list] = lambda values: values

    def positions(self, total: int) -> range:
        return range(self.index, total, self.count)


def current_shard() -> Shard:
    """This process's shard under `accelerate launch` (one shard of one without it).

    CPU-only runs (`accelerate launch --cpu`, or no GPU) use gloo, as accelerate does for them."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    if state.num_processes == 1:
        return Shard()
    return Shard(state.process_index, state.num_processes, gather_object)


def map_prompts(function: Callable[[T], R], items: Sequence[T], shard: Shard) -> list[R]:
    """`[function(x) for x in items]`, each process computing its shard; every process gets the whole list."""
    mine = [(i, function(items[i])) for i in shard.positions(len(items))]
    return [result for _, result in sorted(shard.gather(mine), key=lambda pair: pair[0])]


def merge_statistics(parts: Sequence[dict[str, RunningStats]]) -> dict[str, RunningStats]:
    """One `{site: RunningStats}` from the shards' (in shard order)."""
    parts = [part for part in parts if part]
    return {site: RunningStats.combine([part[site] for part in parts]) for site in parts[0]}


def gather_statistics(statistics: dict[str, RunningStats], shard: Shard) -> dict[str, RunningStats]:
    """Every process's statistics merged (moved to the CPU to travel between processes)."""
    local: Any = {site: stats.to("cpu") for site, stats in statistics.items()}
    return merge_statistics(shard.gather([local]))
