"""`openk2 sft` (issue 7): run folder, bad-example handling, QK-Clip on transformers attention, bit-exact resume."""

import json
import signal

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from openk2.cli import main
from openk2.data.sft_sample import sample_conversations
from openk2.data.tokenizer import load_tokenizer
from openk2.optim import MuonClip
from openk2.train.run import read_metrics
from openk2.train.sft import add_chat_tokens, enable_max_logit_recording, load_sft_config, sft
from tests.train.conftest import MICRO_MODEL, openk2_cli, sets
from tests.train.test_pretrain import losses, run_to_end, wait_for_step


def micro_sft(run_dir, **extra) -> list[str]:
    values = {"run_dir": f'"{run_dir}"', "model.overrides": MICRO_MODEL, "data.vocab_size": "600",
              "data.seq_len": "320", "train.batch_size": "2", "train.steps": "4", "train.eval_every": "4",
              "train.checkpoint_every": "2", "schedule.warmup_steps": "1", **{k: str(v) for k, v in extra.items()}}
    return [f"{k}={v}" for k, v in values.items()]


def test_run_folder_metrics_checkpoint_and_bad_examples(tmp_path):
    data = tmp_path / "chat.jsonl"
    lines = [json.dumps(c) for c in sample_conversations(16)]
    lines.insert(3, "{not json")
    data.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    summary = sft(load_sft_config("configs/sft_tiny.toml", micro_sft(run_dir, **{"data.train": f'["{data}"]'})))
    assert summary["step"] == 4 and summary["bad_examples"] == 1
    assert json.loads((run_dir / "bad_examples.jsonl").read_text()) == {
        "path": str(data), "line": 4, "reason": "malformed JSON (Expecting property name enclosed in double quotes: "
                                                "line 1 column 2 (char 1))"}
    records = read_metrics(run_dir)
    (info,) = [r for r in records if r["kind"] == "data"]
    assert info["bad_examples"] == 1 and info["examples"] + info["val_examples"] == 16
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "lr", "tokens", "trained_tokens", "tokens_per_s", "max_logit", "clipped_fraction"):
        assert key in train[-1], key
    assert train[-1]["tokens"] == 4 * 2 * 320 and 0 < train[-1]["trained_tokens"] < train[-1]["tokens"]
    assert [r["step"] for r in records if r["kind"] == "val"] == [4]
    assert {"loss.png", "max_logit.png"} <= {p.name for p in (run_dir / "plots").iterdir()}
    model_dir = run_dir / "checkpoints" / "step_00000004" / "model"
    assert load_tokenizer(model_dir).vocab_size == json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert "<|tool_call_begin|>" in json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]


def test_fail_mode_stops_at_the_first_bad_line_with_its_number(tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    bad = sample_conversations(2)[1]
    bad["messages"][2]["tool_calls"][0]["function"]["name"] = "not_declared"
    data.write_text(json.dumps(sample_conversations(1)[0]) + "\n" + json.dumps(bad) + "\n")
    code = main(["sft", "configs/sft_tiny.toml", *sets(micro_sft(tmp_path / "run", **{
        "data.train": f'["{data}"]', "data.on_bad_example": '"fail"'}))])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data}:2: messages[2]: tool call names undeclared tool 'not_declared'" in err


def test_qk_clip_records_and_clips_transformers_llama_heads():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa"))
    assert enable_max_logit_recording(model) == 2
    ids = torch.randint(0, 64, (2, 12))
    reference = model(ids).logits  # recording is off until MuonClip turns it on: the sdpa path
    optimizer = MuonClip(model, lr=1e-3, qk_clip_tau=1e-3)  # τ far below any logit: every KV group is clipped
    attn = model.model.layers[0].self_attn
    # a packed row, to check the recorded max respects the block-diagonal mask
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]]).expand(2, -1)
    logits = model(ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(logits[:, :6], reference[:, :6], atol=1e-5, rtol=1e-5)  # recording path = sdpa
    recorded = attn.max_logits.clone()
    logits.sum().backward()
    q_before = attn.q_proj.weight.detach().clone()
    optimizer.step()
    stats = optimizer.clip_stats
    assert stats.layers == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    torch.testing.assert_close(stats.max_logits[0], recorded)
    assert stats.clipped_fraction == 1.0 and attn.max_logits is None
    assert not torch.allclose(attn.q_proj.weight, q_before)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_sft_losses_bit_exactly(tmp_path):
    ref_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    extra = {"train.steps": "10", "train.checkpoint_every": "4", "train.eval_every": "100"}
    run_to_end("sft", "configs/sft_tiny.toml", *sets(micro_sft(ref_dir, **extra)))
    reference = losses(ref_dir)
    assert sorted(reference) == list(range(1, 11))

    proc = openk2_cli("sft", "configs/sft_tiny.toml", *sets(micro_sft(killed_dir, **extra)))
    wait_for_step(killed_dir, 6, proc)  # past the step-4 checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(losses(killed_dir)) < 10
    run_to_end("sft", "--resume", str(killed_dir))
    assert losses(killed_dir) == reference


@pytest.mark.slow
def test_smollm2_learns_k2_tool_calls(tmp_path, smollm2_dir):
    """The real SmolLM2-135M-Instruct, K2's markers added, a few MuonClip steps: the loss drops."""
    run_dir = tmp_path / "run"
    overrides = [f'run_dir="{run_dir}"', f'model.path="{smollm2_dir}"', "data.seq_len=320", "data.val_fraction=0.0",
                 "train.steps=6", "train.batch_size=2", "train.checkpoint_every=6", "schedule.warmup_steps=1",
                 "optim.lr=1e-3", "optim.adamw_lr=1e-4"]
    summary = sft(load_sft_config("configs/sft_smollm2.toml", overrides))
    train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert len(train) == 6 and train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["max_logit"]  # QK-Clip saw SmolLM2's heads
    model_dir = run_dir / "checkpoints" / "step_00000006" / "model"
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.token_to_id("<|tool_call_begin|>") >= 49152  # added, and the embeddings grew to hold it
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == tokenizer.vocab_size
    print(f"SmolLM2 SFT: {summary['counters']['tokens'] / summary['seconds']:.0f} tokens/s")


def test_added_chat_tokens_start_from_their_names_not_from_one_mean(smollm2_dir):
    """Each new marker's row is the mean of its name's pieces: distinct markers, near the words that name them."""
    tokenizer = load_tokenizer(smollm2_dir)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    added = add_chat_tokens(tokenizer, model)
    assert "<|tool_call_end|>" in added and model.get_input_embeddings().weight.shape[0] == tokenizer.vocab_size
    rows = {t: tokenizer.token_to_id(t) for t in added}
    for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        new = table[list(rows.values())]
        assert torch.cdist(new, new).add(torch.eye(len(rows)) * 1e9).min() > 1e-3  # pairwise distinct
        pieces = tokenizer.backend.encode(" tool call end", add_special_tokens=False).ids
        torch.testing.assert_close(table[rows["<|tool_call_end|>"]], table[pieces].mean(dim=0))
