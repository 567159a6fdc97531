"""Work launched on a second CUDA stream beside the main one (the FAM scan beside the window
attention, model/split_attention.py); on other devices the same calls run inline.

The side stream has the higher priority: the scan is a chain of small kernels on the critical
path, and the window attention's many thread blocks fill the SMs the scan leaves free. Memory
crosses streams safely through `record_stream`: inputs made on the main stream and read on the
side one, outputs made on the side stream and read on the main one, are not reused by the caching
allocator before the other stream's queued work is done.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device, priority=-1)  # lower is higher; clamped to the device's range


class Beside:
    """`run` starts fn on the side stream after the main stream's queued work; `join` makes the
    main stream wait for it and hands its outputs over."""

    def __init__(self, device: torch.device):
        self.stream = _side_stream(device) if device.type == "cuda" else None
        self.main = torch.cuda.current_stream(device) if self.stream is not None else None

    def run(self, fn, inputs: tuple, *args):
        if self.stream is None:
            return fn(*args)
        self.stream.wait_stream(self.main)
        for t in inputs:
            t.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            return fn(*args)

    def join(self, outputs: tuple) -> None:
        if self.stream is None:
            return
        self.main.wait_stream(self.stream)
        for t in outputs:
            if t is not None:
                t.record_stream(self.main)
