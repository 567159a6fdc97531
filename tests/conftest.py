"""Shared fixtures: tiny token shards built with the real CLI, and a real `mlflow server` on
loopback (stopped by PID, children first, at the end of the session)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.time_bounds import HANG_GUARD_SECONDS

# The GPU machine has no MLflow (../shared/gpu/README.md), and these files import it at the top: there,
# `pytest -m gpu` (which deselects them anyway) would stop at collection. Where requirements.txt is
# installed (CI, tests/test_install.py) they are collected as always.
collect_ignore = [] if importlib.util.find_spec("mlflow") else ["test_tracking.py", "test_eval_in_loop.py"]

ROOT = Path(__file__).resolve().parent.parent
SHARD_SEQ_LEN = 64


def pytest_addoption(parser):
    parser.addoption("--order", default="file", metavar="ORDER",
                     help="run the collected tests in this order: file (as written), reverse, or shuffle:SEED "
                          "(issue 13: `pytest -m gpu --order reverse` and `--order shuffle:1` on one GPU)")


def pytest_collection_modifyitems(config, items):
    order = config.getoption("--order")
    if order == "file":
        return
    if order == "reverse":
        items.reverse()
        return
    kind, _, seed = order.partition(":")
    if kind != "shuffle" or not seed.isdigit():
        raise pytest.UsageError(f"--order {order!r}: use file, reverse or shuffle:SEED (SEED an integer)")
    random.Random(int(seed)).shuffle(items)


@pytest.fixture(autouse=True)
def _gpu_memory_of_earlier_tests_given_back(request):
    """Before each `gpu` test: the captured FAM scan's buffers, slots and graphs outlive the model
    that made them (model/scan_graphs.py keeps them per shape until `clear()`), and on one H200
    (2026-12-01) fam-1b's 8k to 64k runs left 8.6 GiB there, so a memory test after them measured
    that too. Order independence (issue 13) needs each test to start with the memory given back."""
    if request.node.get_closest_marker("gpu") is not None:
        import gc

        import torch

        from model import scan_graphs

        scan_graphs.clear()
        gc.collect()
        torch.cuda.empty_cache()
    yield


def _write_corpus(folder: Path, docs: int = 40) -> None:
    """Python-like text files, varied enough that a tiny model's loss falls but not to zero."""
    rng = random.Random(0)
    names = ["block", "memory", "fam", "state", "offset", "layer", "token", "query", "value", "step"]
    folder.mkdir(parents=True)
    for i in range(docs):
        lines = [f"# document {i}"]
        for _ in range(30):
            a, b = rng.sample(names, 2)
            lines.append(f"def {a}_{b}({a}, {b}={rng.randint(0, 99)}):\n    return {a} + {b} * {rng.randint(1, 9)}")
        (folder / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """`python -m data_prep.shard` output folder (train/ and valid/) at seq_len 64, byte tokens."""
    root = tmp_path_factory.mktemp("shards")
    _write_corpus(root / "text")
    out = root / "out"
    subprocess.run(
        [sys.executable, "-m", "data_prep.shard", "--input", str(root / "text"), "--tokenizer", "byte",
         "--seq-len", str(SHARD_SEQ_LEN), "--output", str(out), "--samples-per-shard", "32",
         "--valid-fraction", "0.2", "--no-progress"],
        cwd=ROOT, check=True, timeout=HANG_GUARD_SECONDS, capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of thousands of tiny ops (decoding, streamed evaluation): one intra-op thread is
    far faster than two on CI's 2 busy cores (~30x measured for generation)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    """CLI overrides for a seconds-long training run of a 2-layer FAM model on `shards`."""
    values = {
        "model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 2, "model.num_query_groups": None,
        "model.block_size": 16, "model.mem_blocks": 1, "model.fam_len": 4,
        "data.train_manifest": shards / "train" / "manifest.json", "data.valid_manifest": shards / "valid" / "manifest.json",
        "data.seq_len": SHARD_SEQ_LEN, "data.micro_batch_size": 2, "data.global_batch_size": 4,
        "optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.warmup_steps": 2, "optim.grad_clip": 1.0,
        "train.steps": 6, "train.run_dir": run_dir, "train.log_interval_steps": 1, "train.eval_interval_steps": 3,
        "train.eval_steps": 2, "train.progress_bar": False, "train.device": "cpu",
        "checkpoint.save_interval_steps": 3, "checkpoint.keep_last": 2, "tracking.enabled": False,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"--{k}={'null' if v is None else v}" for k, v in values.items()]


# ---------------------------------------------------------------- mlflow server


def _descendants(pid: int) -> list[int]:
    """Child PIDs, recursively, from /proc (every thread's children: a child started by a
    thread is listed under that thread only)."""
    out = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids = map(int, children.read_text().split())
        except OSError:
            continue
        for child in pids:
            out.append(child)
            out.extend(_descendants(child))
    return out


def _alive(pid: int) -> bool:
    """Running, i.e. neither gone nor a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_all(pids: list[int], timeout_seconds: float = 15.0) -> None:
    """SIGTERM to each PID at once (each shuts down in parallel), SIGKILL what is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout_seconds
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """URI of a real `mlflow server` (sqlite backend, proxied artifacts) on 127.0.0.1."""
    from tests.spawn import free_port

    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
        # No job runner: MLflow 3 otherwise starts two huey consumer processes beside the server,
        # which famtron never uses and which take CPU from the tests on CI's two cores.
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + HANG_GUARD_SECONDS
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {server.returncode}: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"mlflow server on {uri} not healthy after {HANG_GUARD_SECONDS:.0f} s")
            time.sleep(0.5)
        yield uri
    finally:
        _stop_all(list(reversed(_descendants(server.pid))) + [server.pid])
        server.wait(timeout=15)
        log.close()
