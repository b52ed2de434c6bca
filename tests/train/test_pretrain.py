import json
import signal
import time

import pytest

from openk2 import K2ForCausalLM, preset
from openk2.data.tokenizer import load_tokenizer
from openk2.optim import split_parameters
from openk2.train.pretrain import build_optimizer, load_pretrain_config
from openk2.train.run import read_metrics
from tests.train.conftest import micro_overrides, openk2_cli, sets


def run_to_end(*args: str) -> str:
    proc = openk2_cli(*args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def wait_for_step(run_dir, step: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"run did not reach step {step}")


@pytest.mark.parametrize("optim", ["muonclip", "adamw"])
def test_adamw_lr_drives_embeddings_head_and_norms_under_either_optimizer(optim):
    model = K2ForCausalLM(preset("tiny").replace(vocab_size=128, num_hidden_layers=2, n_routed_experts=4))
    matrices, rest = ({id(p) for _, p in group} for group in split_parameters(model))

    def lr_of(*overrides: str) -> dict[int, float]:
        opt = build_optimizer(load_pretrain_config(None, [f'optim.name="{optim}"', "optim.lr=0.01", *overrides]), model)
        return {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}

    assert set(lr_of().values()) == {0.01}  # unset: one lr for everything (Moonlight)
    lrs = lr_of("optim.adamw_lr=0.02")
    assert set(lrs) == matrices | rest
    assert {lrs[i] for i in matrices} == {0.01} and {lrs[i] for i in rest} == {0.02}


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["muonclip", "adamw"])
def test_sigkill_then_resume_reproduces_losses_bit_exactly(tmp_path, corpus, optim):
    cache = tmp_path / "cache"
    ref_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    extra = {"optim.name": f'"{optim}"'} | ({"optim.lr": "0.003"} if optim == "adamw" else {})
    run_to_end("pretrain", *sets(micro_overrides(corpus, cache, ref_dir, **extra)))
    reference = losses(ref_dir)
    assert sorted(reference) == list(range(1, 17))

    proc = openk2_cli("pretrain", *sets(micro_overrides(corpus, cache, killed_dir, **extra)))
    wait_for_step(killed_dir, 10, proc)  # past the step-8 checkpoint, mid-way to the next
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(losses(killed_dir)) < 16
    run_to_end("pretrain", "--resume", str(killed_dir))
    resumed = losses(killed_dir)
    assert resumed == reference  # every step, bit for bit (JSON floats round-trip exactly)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus):
    run_dir = tmp_path / "run"
    proc = openk2_cli("pretrain", *sets(micro_overrides(corpus, tmp_path / "cache", run_dir,
                                                        **{"train.steps": "400", "train.checkpoint_every": "1000"})))
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert step == max(losses(run_dir)) and step < 400
    assert "Resume: openk2 pretrain --resume" in out


def test_run_folder_has_config_env_metrics_plots(tmp_path, corpus):
    run_dir = tmp_path / "run"
    out = run_to_end("pretrain", *sets(micro_overrides(corpus, tmp_path / "cache", run_dir, **{"train.steps": "8"})))
    assert "done: 8 steps" in out and "val loss" in out
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    keys = ("loss", "lr", "grad_norm", "tokens_per_s", "max_logit", "clipped_fraction", "expert_load_max_over_mean")
    for key in keys:
        assert key in train[-1], key
    assert len(train[-1]["max_logit"]) == 2  # one per layer
    assert [r["step"] for r in records if r["kind"] == "val"] == [8]
    assert {p.name for p in (run_dir / "plots").iterdir()} == {"loss.png", "max_logit.png", "expert_balance.png"}
    assert "[train]" in (run_dir / "config.toml").read_text()
    assert json.loads((run_dir / "env.json").read_text())["torch"]
    # the checkpoint's model folder is complete: weights, config and the tokenizer that made the data
    model_dir = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip() / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in model_dir.iterdir()}
    assert load_tokenizer(model_dir).vocab_size == json.loads((model_dir / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key train.stepz"),
        ('data.corpus=["/nonexistent/corpus"]', "/nonexistent/corpus"),
        ("EMPTY", "empty corpus"),
    ],
)
def test_bad_input_is_one_clear_error_and_only_an_error_log(tmp_path, corpus, override, message):
    run_dir = tmp_path / "run"
    overrides = micro_overrides(corpus, tmp_path / "cache", run_dir)
    if override == "EMPTY":
        (tmp_path / "empty").mkdir()
        override = f'data.corpus=["{tmp_path / "empty"}"]'
    proc = openk2_cli("pretrain", *sets([*overrides, override]))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    if run_dir.exists():
        assert [p.name for p in run_dir.iterdir()] == ["error.log"]


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, corpus):
    """`train.compile = true` trains the same model: per-step losses and max logits (S_max) as eager, to fp32
    rounding (inductor fuses and reorders the arithmetic, so not bit-exactly)."""
    runs = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compile-{compiled}"
        run_to_end("pretrain", *sets(micro_overrides(corpus, tmp_path / "cache", run_dir, **{
            "train.steps": "6", "train.eval_every": "6", "train.checkpoint_every": "6",
            "train.compile": str(compiled).lower()})))
        runs[compiled] = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    eager, compiled = runs[False], runs[True]
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == list(range(1, 7))
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["max_logit"] == pytest.approx(a["max_logit"], rel=1e-3)
