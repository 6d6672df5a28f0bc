"""Shared by the scripts the tests launch with `deepspeed`: argument handling and output."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist


def script_args() -> list[str]:
    # The deepspeed launcher adds --local_rank=N; the rank is read from the environment.
    return [a for a in sys.argv[1:] if not a.startswith("--local_rank")]


def write_result(path: str, result: dict) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(path).write_text(json.dumps(result, indent=2))
