"""A training step never makes the CPU wait for the GPU (marked `gpu`).

Issue 13: at 8k tokens and micro-batch 1, fam-1b's step left the GPU 13-21 % idle (bswa-1b 1-9 %).
A call that waits for the GPU (a `.item()`, a copy from pageable host memory, a data-dependent
shape) drains the GPU's queue, which then idles while the CPU issues the next kernels.
benchmarks/profiling.py `host_side` lists such calls by Python line (torch.cuda.set_sync_debug_mode);
here it must find the one planted in a step, and none in the training step of every attention
kind, on the compiled, captured GPU path. First run on an H200 (2026-11-30, session 10): it found
the FAM scan's `scales[0] = 0.0` (4 waits per step here; 36-54 per fam-1b step), fixed since, and one
`torch.cuda.synchronize` per step in the BSWA case, whose caller is not known yet.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.profiling import host_side
from benchmarks.step_optimizer import build_step_optimizer, step_autocast
from model import build_model
from tests.test_reference import small_args

pytestmark = pytest.mark.gpu


def test_host_side_names_the_line_that_waits_for_the_gpu():
    x = torch.ones(1024, device="cuda")
    found = host_side(lambda: (x * 2).sum().item(), 1, cuda=True)
    assert len(found["syncs"]) == 1 and "test_gpu_syncs.py" in found["syncs"][0][0], found["syncs"]


@pytest.mark.parametrize("attention, fam_len", [("fam", 16), ("fam", 0), ("dense", 0)])  # FAM, BSWA, dense
def test_a_bf16_mixed_training_step_never_waits_for_the_gpu(attention, fam_len):
    args = small_args(attention=attention, block_size=128, fam_len=fam_len, mem_blocks=1, hidden_size=64,
                      num_attention_heads=4, num_query_groups=2, num_layers=2)
    model = build_model(args, device="cuda")
    optimizer = build_step_optimizer(model, "bf16-mixed")
    tokens = torch.randint(0, args.vocab_size, (1, 4 * 128 + 1), device="cuda")

    def step():
        with step_autocast("cuda", "bf16-mixed"):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # compiles and graph captures happen here
        step()
    assert host_side(step, 1, cuda=True)["syncs"] == []
