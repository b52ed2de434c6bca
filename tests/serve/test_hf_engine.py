"""HFEngine: per-slot KV cache over any transformers causal LM; prefill + decode equal the model's full forward."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from openk2.serve.hf_engine import HFEngine, slot_mask

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def tiny_llama(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation=attn)).eval()


def tiny_qwen2(sliding_window: int | None = None) -> Qwen2ForCausalLM:
    """Qwen2 (q/k/v biases, layer_types); with a window, layer 1 is sliding-window attention."""
    torch.manual_seed(0)
    extra = dict(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=1) if sliding_window else {}
    return Qwen2ForCausalLM(Qwen2Config(**TINY, attn_implementation="sdpa", **extra)).eval()


def full_logits(model, seq: list[int]) -> torch.Tensor:
    """The model's own forward over the whole sequence, no cache: (len, V)."""
    with torch.no_grad():
        return model(torch.tensor([seq]), use_cache=False).logits[0].float()


def sequences(n: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, TINY["vocab_size"], (n,), generator=g).tolist() for n in lengths][:n]


def check_against_full(model, max_batch: int = 4, fused: bool = True) -> None:
    """Prefill prompts of different lengths, then decode slots in varying subsets; every step's logits must equal
    the full forward's at that position."""
    engine = HFEngine(model, max_batch=max_batch, max_seq_len=64, fused=fused)
    prompts = sequences(3, [5, 11, 2])
    slots = [2, 0, 3]  # not in order, not contiguous
    seqs = {s: list(p) for s, p in zip(slots, prompts)}
    got = engine.prefill(slots, prompts)
    for row, s in enumerate(slots):
        torch.testing.assert_close(got[row], full_logits(model, seqs[s])[-1], atol=1e-4, rtol=1e-4)
    g = torch.Generator().manual_seed(7)
    for subset in ([2, 0, 3], [0], [3, 2], [0, 3], [2], [0, 2, 3], [3, 0, 2]):
        tokens = torch.randint(1, TINY["vocab_size"], (len(subset),), generator=g).tolist()
        got = engine.decode(subset, tokens)
        assert got.shape == (len(subset), TINY["vocab_size"]) and got.dtype == torch.float32
        for row, (s, t) in enumerate(zip(subset, tokens)):
            seqs[s].append(t)
            torch.testing.assert_close(got[row], full_logits(model, seqs[s])[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_decode", "model_forward"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_prefill_and_decode_match_full_forward(attn, fused):
    check_against_full(tiny_llama(attn), fused=fused)


def test_qwen2_prefill_and_decode_match_full_forward():
    check_against_full(tiny_qwen2())  # q/k/v biases through the fused decode


def test_fused_decode_serves_the_llama_family_only():
    """Llama and Qwen2 decode through `fused_decode`; what it cannot reproduce falls back to the model's forward."""
    assert HFEngine(tiny_llama(), max_seq_len=16).fused is not None
    assert HFEngine(tiny_qwen2(), max_seq_len=16).fused is not None
    assert HFEngine(tiny_llama(), max_seq_len=16, fused=False).fused is None
    assert HFEngine(tiny_qwen2(sliding_window=4), max_seq_len=16).fused is None
    torch.manual_seed(0)
    biased_o = LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True, attn_implementation="sdpa")).eval()
    assert HFEngine(biased_o, max_seq_len=16).fused is None  # o_proj has a bias too


def test_qwen2_sliding_window_layers_match_full_forward():
    # sequences grow past the window of 4, so the sliding layer's mask really cuts
    check_against_full(tiny_qwen2(sliding_window=4))


def test_reused_slot_forgets_its_previous_sequence():
    model = tiny_llama()
    engine = HFEngine(model, max_batch=2, max_seq_len=32)
    long, short = sequences(2, [20, 3])
    engine.prefill([1], [long])
    engine.decode([1], [5])
    got = engine.prefill([1], [short])  # overwrites slot 1: the long sequence's keys past 3 must not leak in
    torch.testing.assert_close(got[0], full_logits(model, short)[-1], atol=1e-4, rtol=1e-4)
    got = engine.decode([1], [9])
    torch.testing.assert_close(got[0], full_logits(model, short + [9])[-1], atol=1e-4, rtol=1e-4)


def test_contiguous_slots_read_a_view_and_agree_with_a_gather():
    model = tiny_llama()
    a, b = HFEngine(model, max_batch=4, max_seq_len=32), HFEngine(model, max_batch=4, max_seq_len=32)
    prompts = sequences(2, [4, 7])
    a.prefill([1, 2], prompts)  # contiguous: the slice path
    b.prefill([3, 0], prompts)  # not: the gather path
    torch.testing.assert_close(a.decode([1, 2], [3, 4]), b.decode([3, 0], [3, 4]), atol=1e-5, rtol=1e-5)


def test_slot_mask_is_causal_per_row_and_windowed():
    m = slot_mask(torch.tensor([[2], [0]]), kv_len=4)
    assert m.shape == (2, 1, 1, 4)
    assert m[0, 0, 0].tolist() == [True, True, True, False] and m[1, 0, 0].tolist() == [True, False, False, False]
    assert slot_mask(torch.tensor([[3]]), kv_len=4, window=2)[0, 0, 0].tolist() == [False, False, True, True]


def test_bad_calls_name_the_bad_value():
    engine = HFEngine(tiny_llama(), max_batch=2, max_seq_len=8)
    with pytest.raises(ValueError, match="one slot per prompt"):
        engine.prefill([0, 1], [[1, 2]])
    with pytest.raises(ValueError, match=r"prompt lengths \[9\]"):
        engine.prefill([0], [list(range(1, 10))])
    with pytest.raises(ValueError, match=r"slots \[2\]"):
        engine.prefill([2], [[1]])
    with pytest.raises(ValueError, match=r"slots \[0, 0\]"):
        engine.prefill([0, 0], [[1], [2]])
    with pytest.raises(ValueError, match="never prefilled"):
        engine.decode([1], [3])
    engine.prefill([0], [[1] * 8])
    with pytest.raises(ValueError, match="max_seq_len=8"):
        engine.decode([0], [3])
    engine.release([0])
    with pytest.raises(ValueError, match="never prefilled"):
        engine.decode([0], [3])
    flash = tiny_llama()
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        HFEngine(flash)


def test_interface_fields():
    engine = HFEngine(tiny_llama(), max_batch=3, max_seq_len=16)
    assert (engine.max_batch, engine.max_seq_len, engine.vocab_size) == (3, 16, TINY["vocab_size"])
    assert engine.device == torch.device("cpu")


def test_from_pretrained_and_load_weights_replace_weights_in_place(tmp_path):
    first, second = tiny_llama(), tiny_llama()
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.05)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    engine = HFEngine.from_pretrained(tmp_path / "a", max_batch=2)
    assert engine.max_seq_len == TINY["max_position_embeddings"]  # the model's context, under the 2048 cap
    prompt = sequences(1, [6])[0]
    torch.testing.assert_close(engine.prefill([0], [prompt])[0], full_logits(first, prompt)[-1], atol=1e-4, rtol=1e-4)
    weight = engine.model.model.embed_tokens.weight
    engine.load_weights(tmp_path / "b")
    assert engine.model.model.embed_tokens.weight is weight  # in place: same tensors, new values
    with pytest.raises(ValueError, match="never prefilled"):  # the old weights' cache is gone
        engine.decode([0], [1])
    torch.testing.assert_close(engine.prefill([0], [prompt])[0], full_logits(second, prompt)[-1], atol=1e-4, rtol=1e-4)
    other = LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 48}))
    other.save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="shapes differ"):
        engine.load_weights(tmp_path / "c")
