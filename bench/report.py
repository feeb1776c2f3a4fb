"""Shared by the bench scripts: write a result payload as JSON to a file or stdout."""

from __future__ import annotations

import json
import sys
from typing import Any


def emit_json(payload: dict[str, Any], target: str | None) -> None:
    """`target` "-" prints to stdout, a path writes the file, None does nothing."""
    if target == "-":
        json.dump(payload, sys.stdout, indent=2)
        print()
    elif target:
        with open(target, "w", encoding="utf-8") as f:
            f.write(json.dumps(payload, indent=2) + "\n")
