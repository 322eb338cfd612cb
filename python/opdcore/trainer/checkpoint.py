"""Checkpoints that are safe to load from strangers, atomic under kills, and checked for damage.

    step_NNNNNNNN/
      trainer.json     step, scheduler, sampler, config, baseline
      rng_rank{r}.pt   each rank's random states, as tensors and numbers only
      shards/          model and optimizer (torch.distributed.checkpoint, read back through safe_dcp)
      complete.json    step, world size and the SHA-256 of every file above; written last

Everything is written under step_N.tmp, fsynced, and renamed: a kill mid-write never leaves a half checkpoint
under a final name. Loading unpickles nothing beyond tensors and plain types (a crafted file cannot run code),
and checks every file against its checksum; resume=auto falls back to the newest intact checkpoint."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from opdcore.trainer import dist
from opdcore.trainer.safe_dcp import UnsafeCheckpointError, unpickling_refusal

_NAME = re.compile(r"^step_(\d{8})$")
COMPLETE = "complete.json"
STATE = "trainer.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the message names the folder and the disk's free space)."""


def rng_state() -> Dict[str, Any]:
    """This process's random states as tensors, strings and numbers (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: str, step: int, trainer_state: Dict[str, Any], keep: int,
         write_shards: Optional[Callable[[str], None]] = None) -> str:
    """Rank 0 writes the shared state (JSON), every rank its RNG and (through write_shards, called on every rank
    with the temporary folder) its model/optimizer shards; rank 0 then checksums and fsyncs every file, and the
    folder appears under its final name only when complete."""
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    try:
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{dist.rank()}.pt"))
        if write_shards is not None:
            write_shards(tmp)
        if dist.is_main():
            with open(os.path.join(tmp, STATE), "w") as f:
                json.dump(trainer_state, f)
    except Exception as e:
        _write_failed(root, tmp, step, e)
    dist.barrier()
    if dist.is_main():
        try:
            files = {rel: _digest(os.path.join(tmp, rel), sync=True) for rel in _files(tmp)}
            with open(os.path.join(tmp, COMPLETE), "w") as f:
                json.dump({"step": step, "world_size": dist.world(), "sha256": files}, f)
                f.flush()
                os.fsync(f.fileno())
            for folder, _, _ in os.walk(tmp):
                _fsync_dir(folder)
        except OSError as e:
            _write_failed(root, tmp, step, e)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep)
    dist.barrier()
    return final


def _write_failed(root: str, tmp: str, step: int, e: Exception):
    shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(root).free / 2 ** 30
    full = "No space left" in str(e) or any(isinstance(x, OSError) and x.errno == errno.ENOSPC
                                           for x in (e, e.__cause__, e.__context__))
    raise CheckpointWriteError(
        f"writing the checkpoint of step {step} to {tmp} failed"
        + (": the disk is full" if full else f" ({type(e).__name__}: {e})")
        + f"; {free:.2f} GiB free on the disk holding {root}. The previous checkpoints are intact; free space "
          f"(or lower train.keep_checkpoints) and rerun with train.resume=auto to continue from the last one") from e


def complete(root: str) -> List[str]:
    """The complete checkpoints under root, newest first (temporary or unfinished folders are ignored)."""
    if not os.path.isdir(root):
        return []
    found = sorted(((int(m.group(1)), n) for n in os.listdir(root) if (m := _NAME.match(n))
                    and os.path.isfile(os.path.join(root, n, COMPLETE))), reverse=True)
    return [os.path.join(root, n) for _, n in found]


def latest(root: str) -> Optional[str]:
    """The newest complete checkpoint under root (not checked for damage: see latest_intact)."""
    found = complete(root)
    return found[0] if found else None


def damage(path: str) -> Optional[str]:
    """What is wrong with the checkpoint at path (a missing or changed file), or None when every file matches
    the checksum its completion marker recorded."""
    try:
        with open(os.path.join(path, COMPLETE)) as f:
            sums = json.load(f).get("sha256")
    except (OSError, ValueError, AttributeError) as e:
        return f"its {COMPLETE} is unreadable ({e})"
    if sums is None:  # written before checksums were recorded
        return None
    if not isinstance(sums, dict):
        return f"its {COMPLETE} is malformed"
    for rel, want in sums.items():
        full = os.path.normpath(os.path.join(path, rel))
        if os.path.isabs(rel) or not full.startswith(os.path.normpath(path) + os.sep):
            return f"its {COMPLETE} names {rel!r}, outside the checkpoint"
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if _digest(full) != want:
            return f"{rel} does not match the checksum recorded when it was written (damaged or changed since)"
    return None


def latest_intact(root: str) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The newest complete checkpoint whose files all match their checksums, and the newer ones skipped as
    (path, what is wrong). Rank 0 reads the files; every rank gets its verdict."""
    if not dist.is_main():
        return dist.broadcast_object(None)
    skipped = []
    for path in complete(root):
        problem = damage(path)
        if problem is None:
            return dist.broadcast_object((path, skipped))
        skipped.append((path, problem))
    return dist.broadcast_object((None, skipped))


def load(path: str, check: bool = True) -> Dict[str, Any]:
    """The trainer state with "world_size" (of the run that wrote it) and "rng": this rank's RNG state, or None
    when the checkpoint was written at another world size (its per-rank streams do not map onto this run's).
    check: verify the checksums first (rank 0). Clear errors for a missing, damaged or unsafe checkpoint."""
    marker = os.path.join(path, COMPLETE)
    if not os.path.isfile(marker):
        raise ValueError(f"{path} is not a complete opdcore checkpoint (no {COMPLETE})")
    if check:
        problem = dist.broadcast_object(damage(path) if dist.is_main() else None)
        if problem:
            raise ValueError(f"checkpoint {path} is damaged: {problem}")
    try:
        with open(marker) as f:
            meta = json.load(f)
        if os.path.isfile(os.path.join(path, STATE)):
            with open(os.path.join(path, STATE)) as f:
                state = json.load(f)
        else:  # written before trainer.json: the same content as a torch file
            state = _load_plain(os.path.join(path, "trainer.pt"))
        same_world = meta["world_size"] == dist.world()
        rng = _load_plain(os.path.join(path, f"rng_rank{dist.rank()}.pt")) if same_world else None
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or corrupt files
        raise ValueError(f"checkpoint {path} is corrupt or unreadable: {e}") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"checkpoint {path} is corrupt: its trainer state has no step")
    state["world_size"], state["rng"] = meta["world_size"], rng
    return state


def _load_plain(path: str) -> Any:
    """A torch file of tensors and plain Python values only (weights_only: nothing is unpickled that could run
    code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{path} holds Python objects beyond tensors and plain values: refused, "
                                    f"nothing in it was run ({unpickling_refusal(e)})") from None


def _files(folder: str) -> List[str]:
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)


def _digest(path: str, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        if sync:  # written by any rank: its data is on the disk before the marker names it
            os.fsync(f.fileno())
    return h.hexdigest()


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
