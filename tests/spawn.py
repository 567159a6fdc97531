"""Run a function on N gloo processes and collect each rank's plain-Python return value.

Workers return plain objects (floats, dicts of numpy arrays): tensors sent through a queue
break once the worker exits. Every wait is bounded by a timeout.

Workers fork from a server process that imported torch, megatron-core and famtron once
(multiprocessing's "forkserver" with preloaded modules), not from fresh interpreters ("spawn"),
which import them again in every worker: about 6.5 s of CPU per worker on CI's machine, the
larger part of most distributed tests. The server runs no torch op, so no thread pool is forked.
A worker takes the caller's environment, working folder and OMP_NUM_THREADS at the call, not the
server's at its start. DeepSpeed is preloaded only for its CPU accelerator (tests/spawn_preload.py):
importing it fixes its accelerator from the environment of that moment.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.multiprocessing as mp

from tests.time_bounds import HANG_GUARD_SECONDS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELOAD = ["torch", "megatron.core", "model", "pipeline.train", "tests.spawn_preload"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx  # the preload list counts only before the server's first start (once per pytest run)


def _entry(rank, world_size, port, fn, args, queue, env, cwd):
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_on_ranks(fn, world_size: int, *args, timeout_seconds: float = HANG_GUARD_SECONDS) -> list:
    """fn(rank, world_size, *args) on world_size processes; returns results in rank order."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    env, cwd = dict(os.environ), os.getcwd()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, env, cwd)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout_seconds)
            (results.__setitem__(rank, value) if status == "ok" else errors.append(f"rank {rank}:\n{value}"))
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
