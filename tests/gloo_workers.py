"""Run a test body on several real processes joined by a gloo process group (torch.multiprocessing.spawn)."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(fn, world, tmp_path):
    """fn(rank, world) on `world` processes (1 thread each); a failing check in any of them fails the test."""
    mp.spawn(_entry, args=(fn, world, str(tmp_path / "pg")), nprocs=world, join=True)


def _entry(rank, fn, world, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        fn(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A finished worker skips interpreter teardown, where about 1 run in 10 a still-joinable background thread of
    # the DTensor / gloo stack aborted the process ("terminate called without an active exception"). A failing
    # check raises above and is reported as usual.
    os._exit(0)
