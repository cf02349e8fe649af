"""Several torch.distributed ranks on one machine: forked processes in one gloo process group."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

__all__ = ["run_gloo_ranks"]


def _rank(rank: int, world: int, directory: str, worker: Callable[..., Any], args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/init", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(worker(rank, world, *args), Path(directory) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(worker: Callable[..., Any], directory: Path, *args: Any, world: int = 2,
                   timeout: float = 120) -> list[Any]:
    """``worker(rank, world, *args)`` in ``world`` forked processes, each a rank of one gloo process group
    (one intra-op thread each), and what each returns (saved with ``torch.save`` in ``directory``), in
    rank order. The test fails if the ranks do not finish in ``timeout`` seconds; a rank that fails
    fails the test with its traceback."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_rank, args=(world, str(directory), worker, args), nprocs=world, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the gloo ranks did not finish in {timeout:g} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(Path(directory) / f"rank{rank}.pt") for rank in range(world)]
