"""Atomic checkpoints: written to a temporary folder, then renamed, so a kill mid-write never corrupts the last
good one. `latest()` finds the newest complete checkpoint for resume=auto."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from opdcore.trainer import dist

_NAME = re.compile(r"^step_(\d{8})$")
COMPLETE = "complete.json"


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: str, step: int, trainer_state: Dict[str, Any], keep: int,
         write_shards: Optional[Callable[[str], None]] = None) -> str:
    """Rank 0 writes the shared state, every rank its RNG and (through write_shards, called on every rank with
    the temporary folder) its model/optimizer shards; the folder appears under its final name only when
    complete."""
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{dist.rank()}.pt"))
    if write_shards is not None:
        write_shards(tmp)
    if dist.is_main():
        torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    dist.barrier()
    if dist.is_main():
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            json.dump({"step": step, "world_size": dist.world()}, f)
        _fsync_dir(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep)
    dist.barrier()
    return final


def latest(root: str) -> Optional[str]:
    """The newest complete checkpoint under root (temporary or incomplete folders are ignored)."""
    if not os.path.isdir(root):
        return None
    found = sorted((int(m.group(1)), n) for n in os.listdir(root) if (m := _NAME.match(n))
                   and os.path.isfile(os.path.join(root, n, COMPLETE)))
    return os.path.join(root, found[-1][1]) if found else None


def load(path: str) -> Dict[str, Any]:
    """The trainer state with "world_size" (of the run that wrote it) and "rng": this rank's RNG state, or None
    when the checkpoint was written at another world size (its per-rank streams do not map onto this run's).
    Clear errors for a missing or corrupt checkpoint."""
    marker = os.path.join(path, COMPLETE)
    if not os.path.isfile(marker):
        raise ValueError(f"{path} is not a complete opdcore checkpoint (no {COMPLETE})")
    try:
        with open(marker) as f:
            meta = json.load(f)
        state = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=False)
        same_world = meta["world_size"] == dist.world()
        rng = torch.load(os.path.join(path, f"rng_rank{dist.rank()}.pt"), map_location="cpu",
                         weights_only=False) if same_world else None
    except Exception as e:  # truncated or corrupt files
        raise ValueError(f"checkpoint {path} is corrupt or unreadable: {e}") from e
    state["world_size"], state["rng"] = meta["world_size"], rng
    return state


def _prune(root: str, keep: int) -> None:
    done = sorted(n for n in os.listdir(root) if _NAME.match(n))
    for n in done[:-keep]:
        shutil.rmtree(os.path.join(root, n), ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
