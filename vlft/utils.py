"""Small helpers shared by every stage."""
from __future__ import annotations

import os
import sys


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    """Print once per job (rank 0 only), flushed so it interleaves with the Trainer's output."""
    if is_main_process():
        print(f"[vlft] {msg}", file=sys.stderr, flush=True)
