"""Start a gloo process group in fresh worker processes on a free local port.

Named uniquely (not conftest) so tests import it explicitly; each test gets its own port.

The workers are forked from a "forkserver": one clean process, started once per test session, that has imported
torch, torch._dynamo (the optimizers import it on construction) and moekit. A worker then starts in well under a
second instead of importing all of that itself (about 8 s of CPU per worker here, most of the distributed tests'
time on 2 cores). The forkserver has run nothing (no process group, no thread pool), so a worker is what a spawned
one is, with the modules already imported; its environment is the session's when the forkserver started, and each
worker sets the variables of its rank itself.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Imported once in the forkserver (an import that fails there is left to each worker, which raises it as usual).
PRELOAD = ["numpy", "safetensors.torch", "torch", "torch._dynamo", "torch.distributed.checkpoint",
           "torch.distributed.fsdp", "moekit", "moekit.training.trainer", "moekit.lab.training.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    # What torchrun sets: code that asks the launch for its world size (e.g. train --resume) sees it.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        fn(rank, world, *args)
        # Tear down together: a rank that destroys its gloo group while a peer is still finishing its last
        # exchange can abort the peer ("terminate called without an active exception", seen in CI-like runs).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A spawned worker that returns normally exits through interpreter finalisation, where gloo's C++ threads and
    # objects are torn down in no fixed order; under load that has aborted a rank (SIGABRT) after its work was
    # done and checked. Everything this worker wrote is closed by now, so leave without finalisation.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def context():
    """The multiprocessing context the workers start in (for tests that start their own processes)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the forkserver starts, on the session's first use
    return ctx


def spawn(fn: Callable, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; an exception in any rank fails the caller."""
    context()
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="forkserver")
