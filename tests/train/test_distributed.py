"""`torchrun --nproc_per_node 2 -m openk2 pretrain` (issue 4, item 4): FSDP2 over 2 gloo processes on CPU."""

import os
import shutil
import signal

import pytest
import torch

from openk2.model import K2ForCausalLM
from openk2.train import checkpoint as ckpt
from openk2.train.run import read_metrics
from tests.train.conftest import micro_overrides, openk2_cli, sets
from tests.train.test_pretrain import losses, wait_for_step

# τ below the micro model's max logits (0.04–0.1 over these steps), so QK-Clip rescales sharded q/k rows
CLIPPING = {"optim.name": '"muonclip"', "optim.qk_clip_tau": "0.06", "train.steps": "20"}


def run_to_end(*args: str, nproc: int = 1) -> None:
    proc = openk2_cli(*args, nproc=nproc)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def records(run_dir, kind: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if r["kind"] == kind}


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, corpus):
    """Losses within 1e-5 relative over 20 MuonClip steps: Muon on DTensors, S_max all-reduced, heads clipped."""
    cache, one, two = tmp_path / "cache", tmp_path / "one", tmp_path / "two"
    run_to_end("pretrain", *sets(micro_overrides(corpus, cache, one, **CLIPPING)))
    run_to_end("pretrain", *sets(micro_overrides(corpus, cache, two, **CLIPPING)), nproc=2)

    reference, sharded = records(one, "train"), records(two, "train")
    assert sorted(reference) == sorted(sharded) == list(range(1, 21))
    for step, r in reference.items():
        assert sharded[step]["loss"] == pytest.approx(r["loss"], rel=1e-5), step
        assert sharded[step]["clipped_fraction"] == r["clipped_fraction"], step
    for run in (reference, sharded):  # QK-Clip fired in both, on full and on sharded weights
        assert max(r["clipped_fraction"] for r in run.values()) > 0
    val_one, val_two = records(one, "val"), records(two, "val")
    assert sorted(val_one) == sorted(val_two) == [8, 16, 20]
    for step, r in val_one.items():
        assert val_two[step]["val_loss"] == pytest.approx(r["val_loss"], rel=1e-5), step

    # the 2-rank checkpoint holds the full model in hub layout, and a full optimizer state
    full = K2ForCausalLM.from_pretrained(ckpt.latest_checkpoint(one / "checkpoints") / "model").state_dict()
    gathered = K2ForCausalLM.from_pretrained(ckpt.latest_checkpoint(two / "checkpoints") / "model").state_dict()
    assert full.keys() == gathered.keys()
    for name, tensor in full.items():
        torch.testing.assert_close(gathered[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    state_one = ckpt.load_trainer_state(ckpt.latest_checkpoint(one / "checkpoints"))["optimizer"]["state"]
    state_two = ckpt.load_trainer_state(ckpt.latest_checkpoint(two / "checkpoints"))["optimizer"]["state"]
    assert state_one.keys() == state_two.keys()
    for i, values in state_one.items():
        for key, value in values.items():
            assert state_two[i][key].shape == value.shape, (i, key)


@pytest.mark.slow
def test_two_rank_sigkill_then_resume(tmp_path, corpus):
    """SIGKILL both ranks mid-run: resuming on 2 ranks repeats the run bit for bit; on 1 rank, to 1e-5."""
    cache, ref_dir, killed = tmp_path / "cache", tmp_path / "reference", tmp_path / "killed"
    extra = {**CLIPPING, "train.steps": "40", "train.checkpoint_every": "5"}
    run_to_end("pretrain", *sets(micro_overrides(corpus, cache, ref_dir, **extra)), nproc=2)
    reference = losses(ref_dir)
    assert sorted(reference) == list(range(1, 41))

    proc = openk2_cli("pretrain", *sets(micro_overrides(corpus, cache, killed, **extra)), nproc=2,
                      start_new_session=True)
    wait_for_step(killed, 12, proc)  # past the step-10 checkpoint
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks at once
    proc.wait()
    assert max(losses(killed)) < 40
    one_rank = tmp_path / "one_rank"
    shutil.copytree(killed, one_rank)

    run_to_end("pretrain", "--resume", str(killed), nproc=2)
    assert losses(killed) == reference
    run_to_end("pretrain", "--resume", str(one_rank))  # the same checkpoint on 1 rank: checkpoints are full
    resumed = losses(one_rank)
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5), step


@pytest.fixture
def one_rank_group(monkeypatch):
    """A 1-process gloo group initialised by the caller, as a user's own script would."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_close_destroys_only_the_group_it_created(one_rank_group, monkeypatch):
    """A group the caller set up outlives training; the one `from_env` set up is destroyed by `close`."""
    from openk2.train.distributed import Distributed

    monkeypatch.setenv("WORLD_SIZE", "2")  # looks like torchrun, but the group already exists
    theirs = Distributed.from_env()
    assert (theirs.world_size, theirs.owns_group) == (2, False)
    theirs.close()
    assert torch.distributed.is_initialized()

    ours = Distributed(rank=0, world_size=1, owns_group=True)
    ours.close()
    assert not torch.distributed.is_initialized()
    ours.close()  # a second close is a no-op
