"""Start a gloo process group in ``torch.multiprocessing.spawn`` workers on a free local port.

Named uniquely (not conftest) so tests import it explicitly; each test gets its own port.
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


def spawn(fn: Callable, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; an exception in any rank fails the caller."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
