"""Shared pieces of the CLI: the app, the console, option types, one-line errors, JSON output."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, TypeVar

import typer
from rich.console import Console

from workbench.errors import WorkbenchError

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
def user_errors() -> Iterator[None]:
    """Expected failures become one line on stderr and exit code 2."""
    try:
        yield
    except (WorkbenchError, FileExistsError, FileNotFoundError, PermissionError) as err:
        if _debug["on"]:
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        raise typer.Exit(2) from None


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def load_model(model: Path, device: str, dtype: str, family: str):
    import workbench

    return workbench.load(model, device=device, dtype=dtype, family=family)


def comma_list(text: str | None) -> tuple[str, ...] | None:
    """'a, b,' -> ('a', 'b'); None or nothing but commas -> None."""
    items = tuple(part.strip() for part in (text or "").split(",") if part.strip())
    return items or None


T = TypeVar("T")


def with_status(json_out: bool, description: str, work: Callable[[Callable[[str], None]], T]) -> T:
    """Run `work(advance)` under a transient spinner (hidden with --json); `advance(text)` updates its line."""
    from rich.markup import escape
    from rich.progress import Progress

    with Progress(console=console, transient=True, disable=json_out) as progress:
        task = progress.add_task(description, total=None)
        return work(lambda text: progress.update(task, description=escape(text)))
