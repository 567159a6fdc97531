"""Checkpoint files: atomic saves, keep-last-K, auto-resume picks the newest complete one and
falls back, with a warning naming it, from a corrupt or an incomplete one; a save that fails
midway leaves the last good checkpoint untouched. RNG states round-trip."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from pipeline.checkpointing.files import (MANIFEST, find_latest_checkpoint, list_checkpoints, load_file, rng_state,
                                 save_checkpoint, set_rng_state, step_dir_name, verify_checkpoint)


def _files(step: int) -> dict:
    return {"model_tp00.pt": {"w": torch.full((3,), float(step))}, "config.yaml": f"step: {step}\n"}


def test_save_writes_manifest_with_checksums_and_no_temp_folder(tmp_path):
    path = save_checkpoint(tmp_path, 5, _files(5), keep_last=3)
    assert path == tmp_path / "step_00000005" and path.name == step_dir_name(5)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 5 and sorted(manifest["files"]) == ["config.yaml", "model_tp00.pt"]
    assert all(len(digest) == 64 for digest in manifest["files"].values())
    assert verify_checkpoint(path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]
    assert torch.equal(load_file(path, "model_tp00.pt")["w"], torch.full((3,), 5.0))
    assert load_file(path, "config.yaml") == "step: 5\n"


def test_keep_last_deletes_the_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, _files(step), keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_auto_resume_picks_the_newest_complete(tmp_path):
    for step in (10, 20):
        save_checkpoint(tmp_path, step, _files(step), keep_last=3)
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000020"
    assert find_latest_checkpoint(tmp_path / "missing") is None


def test_corrupt_newest_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    for step in (10, 20):
        save_checkpoint(tmp_path, step, _files(step), keep_last=3)
    newest = tmp_path / "step_00000020"
    data = bytearray((newest / "model_tp00.pt").read_bytes())
    data[-10] ^= 0xFF  # one flipped byte
    (newest / "model_tp00.pt").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="famtron"):
        assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000010"
    assert str(newest) in caplog.text and "sha256" in caplog.text and "model_tp00.pt" in caplog.text


def test_incomplete_newest_without_manifest_is_skipped_with_a_warning(tmp_path, caplog):
    for step in (10, 20):
        save_checkpoint(tmp_path, step, _files(step), keep_last=3)
    (tmp_path / "step_00000020" / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="famtron"):
        assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000010"
    assert "step_00000020" in caplog.text and "incomplete" in caplog.text


def test_missing_file_and_unreadable_manifest_are_reported(tmp_path):
    path = save_checkpoint(tmp_path, 1, _files(1), keep_last=3)
    (path / "config.yaml").unlink()
    assert "config.yaml is missing" in verify_checkpoint(path)
    (path / MANIFEST).write_text("{not json")
    assert "unreadable" in verify_checkpoint(path)


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # stands in for any failure while writing


def test_a_failed_save_leaves_the_last_good_checkpoint_and_is_cleaned_next_time(tmp_path):
    save_checkpoint(tmp_path, 10, _files(10), keep_last=1)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 20, {"a.pt": torch.ones(1), "b.pt": _Unpicklable()}, keep_last=1)
    # keep_last=1 did not delete step 10: pruning happens only after a complete save
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000010"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]
    assert (tmp_path / ".tmp_step_00000020").exists()  # the debris is invisible to resume ...
    save_checkpoint(tmp_path, 30, _files(30), keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000030"]  # ... and removed by the next save


def test_saving_a_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 10, _files(10), keep_last=3)
    save_checkpoint(tmp_path, 10, _files(99), keep_last=3)
    assert torch.equal(load_file(tmp_path / "step_00000010", "model_tp00.pt")["w"], torch.full((3,), 99.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010"]


def test_rng_states_round_trip():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
