"""convert_gguf and `openk2 convert gguf`: bad input, and the real SmolLM2 GGUF converted, served, answering."""

import json

import pytest
import torch

from openk2.cli import main
from openk2.model.gguf import check_gguf, convert_gguf, smollm2_gguf_path


def test_missing_file_and_bad_magic_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"not a GGUF file: it starts with b'PK\\x03\\x04'"):
        convert_gguf(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_empty_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty; pass force=True"):
        convert_gguf(smollm2_gguf_path(), out)
    assert (out / "keep.txt").read_text() == "mine"


def test_smollm2_gguf_is_found_inside_the_package():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert check_gguf(path) == path


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello")
    assert main(["convert", "gguf", str(fake), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openk2 convert: error:") and "not a GGUF file" in err and "\n" not in err


@pytest.mark.slow
def test_smollm2_converts_serves_and_answers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openk2.serve.hf_engine import HFEngine

    out = tmp_path / "smollm2"
    out.mkdir()
    (out / "stale.txt").write_text("replaced by --force")
    assert main(["convert", "gguf", "smollm2", str(out), "--force"]) == 0  # smollm2: the packaged GGUF
    assert f"checkpoint folder written to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and "<|im_start|>assistant" in tok_config["chat_template"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    tokenizer = AutoTokenizer.from_pretrained(out)
    questions = ["What is the capital of France?", "Name a primary color."]
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True),
                         add_special_tokens=False).input_ids for q in questions]
    engine = HFEngine.from_pretrained(out, max_batch=2, max_seq_len=256)
    assert engine.vocab_size == 49152

    # greedy, both prompts batched in one engine, each until EOS or 24 tokens
    new_tokens, eos = 24, tokenizer.eos_token_id
    outputs = [[] for _ in prompts]
    active = [0, 1]
    logits = engine.prefill(active, prompts)
    while active:
        tokens = logits.argmax(-1).tolist()
        for s, t in zip(active, tokens):
            outputs[s].append(t)
        active = [s for s in active if outputs[s][-1] != eos and len(outputs[s]) < new_tokens]
        if active:
            logits = engine.decode(active, [outputs[s][-1] for s in active])
    answer = tokenizer.decode(outputs[0], skip_special_tokens=True)
    assert "Paris" in answer, answer

    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for prompt, got in zip(prompts, outputs):
        ids = torch.tensor([prompt])
        want = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos)
        assert got == want[0, len(prompt):].tolist()
