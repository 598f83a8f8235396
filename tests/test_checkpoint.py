"""Checkpoint files are data: every load is weights_only, and a tampered file is refused
before its payload can run."""
from __future__ import annotations

import os

import pytest
import torch

from dbl_scale.checkpoint import CheckpointError, rng_state, safe_load, set_rng_state, verify_safe


class _Payload:
    """What an attacker would put into a checkpoint: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_tampered_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "state.pt"
    torch.save({"step": 3, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*state.pt.*could run code.*posix.system"):
        safe_load(path)
    with pytest.raises(CheckpointError):
        verify_safe(tmp_path)
    assert not marker.exists()
    torch.save({"step": 3, "weights": torch.ones(2)}, path)
    assert safe_load(path)["step"] == 3


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    torch.save(state, tmp_path / "rank.pt")
    want = (random.random(), float(np.random.rand()), torch.rand(1).item())
    set_rng_state(safe_load(tmp_path / "rank.pt"))
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == want


def test_aoq_candidates_travel_in_a_checkpoint_as_plain_data(tmp_path):
    from dbl_scale.mining import Candidates

    cands = Candidates(torch.tensor([7, 3, 5]), 2, torch.randint(0, 6, (3, 4)), torch.randint(0, 3, (6, 2)),
                       split="train", run="runs/a", meta={"world": 2})
    torch.save({"method": {"aoq": {"candidates": cands.to_dict()}}}, tmp_path / "state.pt")
    back = Candidates.from_dict(safe_load(tmp_path / "state.pt")["method"]["aoq"]["candidates"])
    assert torch.equal(back.image_ids, cands.image_ids) and torch.equal(back.caption_candidates, cands.caption_candidates)
    assert torch.equal(back.image_candidates, cands.image_candidates) and back.meta == {"world": 2}


def test_keep_the_newest_complete_checkpoints_and_ignore_half_written_ones(tmp_path):
    """`checkpoint.keep=2`: after four saves only the last two remain; a `.tmp` folder left by
    a crash mid-save, or a folder without its COMPLETE marker, is never resumed from."""
    from types import SimpleNamespace

    from dbl_scale import checkpoint

    branches = [SimpleNamespace(engine=None, role="frozen")]  # nothing of its own to save
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, step, branches, {"step": step}, {"rng": checkpoint.rng_state()}, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    (tmp_path / "step_00000050.tmp").mkdir()  # a crash while writing step 50
    (tmp_path / "step_00000060").mkdir()  # renamed but never marked complete (cannot happen; still ignored)
    assert checkpoint.resolve(tmp_path, "latest").name == "step_00000040"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve(tmp_path, str(tmp_path / "step_00000060"))
    state, rank_state = checkpoint.load(checkpoint.resolve(tmp_path, "latest"), branches)
    assert state["step"] == 40 and set(rank_state) == {"rng"}


def test_a_checkpoint_of_another_kind_of_run_is_refused_naming_the_difference(tmp_path):
    """Resuming a checkpoint written by another method, other towers or another number of
    ranks fails before anything is loaded, with an error that says what differs."""
    from types import SimpleNamespace

    from dbl_scale import checkpoint

    def branches(width):
        return [SimpleNamespace(engine=None, role="trained", module=torch.nn.Linear(width, 4))]

    written = branches(8)
    checkpoint.save(tmp_path, 5, written, {"step": 5, "layout": checkpoint.layout("dbl", written)},
                    {"rng": checkpoint.rng_state()}, keep=1)
    path = checkpoint.resolve(tmp_path, "latest")
    assert checkpoint.load(path, written, checkpoint.layout("dbl", written))[0]["step"] == 5
    wider = branches(16)
    with pytest.raises(checkpoint.CheckpointError, match=r"another kind of run \(method: dbl in the checkpoint, "
                                                         r"triplet in this run; parameters: \[36\] in the checkpoint, "
                                                         r"\[68\] in this run\)"):
        checkpoint.load(path, wider, checkpoint.layout("triplet", wider))
