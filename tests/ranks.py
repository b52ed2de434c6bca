"""Run a test function on N gloo ranks in spawned processes: the tests' one way to do it.

Each rank writes what the function returned (or its traceback) before the group is torn down, then
leaves with `os._exit`, skipping interpreter finalization: gloo's worker threads can still hold work
objects then, and releasing them during finalization aborts the process (pytorch/pytorch PR 179291).
A CI run once lost a rank to SIGABRT that way, after the test's collectives were done.
"""

from __future__ import annotations

import os
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessExitedException

TIMEOUT = timedelta(seconds=120)  # a rank that dies mid-collective fails the test in minutes, not gloo's 30


def _rank_main(rank: int, world: int, folder: Path, fn, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder / 'init'}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    ok = False
    try:
        result, ok = fn(rank, world, *args), True
    except Exception:  # spawn would only report that a process died: keep the traceback for the test's message
        result = traceback.format_exc()
    torch.save((ok, result), folder / f"result.{rank}")
    if ok:
        try:
            dist.barrier()  # neither rank closes its connections while the other still talks to it
        except RuntimeError:
            pass  # the peer failed and left: its traceback is in its result file
    dist.destroy_process_group()
    os._exit(0)


def run_on_ranks(fn, tmp_path: Path, *args, world: int = 2) -> list:
    """`fn(rank, world, *args)` on `world` gloo ranks (a process group is up, `fn` must be importable);
    returns each rank's return value, or fails with the traceback of each rank that raised.

    A rank killed by a signal is run again once, with a warning: the crash the module docstring names
    comes from torch's teardown, not from the function under test. A second one fails the test.
    """
    for attempt in (1, 2):
        folder = tmp_path / f"ranks-{attempt}"
        folder.mkdir()
        try:
            torch.multiprocessing.spawn(_rank_main, args=(world, folder, fn, args), nprocs=world)
            break
        except ProcessExitedException as e:
            if attempt == 2 or e.signal_name is None:
                raise
            warnings.warn(f"rank {e.error_index} died by {e.signal_name}; running the ranks once more", stacklevel=2)
    results = [torch.load(folder / f"result.{r}", weights_only=False) for r in range(world)]
    errors = [f"rank {r}:\n{out}" for r, (ok, out) in enumerate(results) if not ok]
    if errors:
        raise AssertionError("\n".join(errors))
    return [out for _, out in results]
