"""Loading torch.distributed.checkpoint shards without running code from them.

DCP reads its `.metadata` file with plain `pickle.load` (a crafted file runs anything it names) and its
non-tensor items (the optimizer's hyperparameters) with `torch.load(weights_only=False)`. Checkpoints get shared
and downloaded, so here the metadata is first read by an unpickler that builds only DCP's own metadata classes and
a few torch value types (and checked to name only shard files in its own folder), and every non-tensor item is
loaded with `weights_only=True` (tensors already are)."""
from __future__ import annotations

import io
import os
import pickle
import warnings
from typing import Any, Dict

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

METADATA = ".metadata"  # DCP's file name for the global layout
# what DCP's metadata pickle refers to besides the classes of torch.distributed.checkpoint.metadata
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something opdcore will not load (it could run code)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == dcp_metadata.__name__:
            obj = getattr(dcp_metadata, name, None)
            if isinstance(obj, type) and obj.__module__ == module:  # its dataclasses and enums
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refers to {module}.{name}, which a checkpoint's metadata never needs")


def check_metadata(folder: str) -> None:
    """Read folder/.metadata with the restricted unpickler; raise UnsafeCheckpointError (naming the file) when it
    refers to anything else or points at files outside the folder."""
    path = os.path.join(folder, METADATA)
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path} {e}: refused, nothing in it was run") from None
    except Exception as e:  # truncated or not a pickle
        raise ValueError(f"{path} is corrupt or unreadable: {e}") from e
    if not isinstance(md, dcp_metadata.Metadata):
        raise UnsafeCheckpointError(f"{path} holds a {type(md).__name__}, not DCP metadata: refused")
    for info in (md.storage_data or {}).values():
        name = str(getattr(info, "relative_path", ""))
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise UnsafeCheckpointError(f"{path} points at {name!r}, outside its folder: refused")


def unpickling_refusal(e: Exception) -> str:
    """The line of a weights_only refusal that says what was refused."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return next((x for x in lines if "GLOBAL" in x), lines[0] if lines else type(e).__name__)


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's default planner, with non-tensor items loaded as tensors and plain types only."""

    refused = None  # DCP wraps every error in its own exception: the refusal is kept here to be raised as is

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            self.refused = (f"item {read_item.dest_index.fqn} holds objects beyond tensors and plain types: refused, "
                            f"nothing in it was run ({unpickling_refusal(e)})")
            raise UnsafeCheckpointError(self.refused) from None
        plain = io.BytesIO()  # the checked object, re-serialised for the default planner's own loading
        torch.save(obj, plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)


def load(state_dict: Dict[str, Any], folder: str) -> None:
    """dcp.load into state_dict (in place) from folder, refusing anything but tensors and plain values."""
    check_metadata(folder)
    planner = _WeightsOnlyPlanner()
    try:
        with warnings.catch_warnings():  # one process: no process group, as intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state_dict, checkpoint_id=folder, planner=planner)
    except CheckpointException as e:  # a BaseException: it passes `except Exception`
        if planner.refused:
            raise UnsafeCheckpointError(f"{folder}: {planner.refused}") from None
        causes = [f"{type(x[0]).__name__}: {str(x[0])[:300]}" for x in e.failures.values()]
        raise ValueError(f"the model and optimizer shards in {folder} could not be read ("
                         + "; ".join(causes) + ")") from None


def save(state_dict: Dict[str, Any], folder: str) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state_dict, checkpoint_id=folder)
