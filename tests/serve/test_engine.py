import pytest
import torch

from openk2 import K2ForCausalLM, preset
from openk2.serve import Engine, LatentCache, SamplingParams

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_model(**changes) -> K2ForCausalLM:
    # 3 layers: one dense then two MoE; a larger init than training's so logits are far from uniform
    config = preset("tiny").replace(vocab_size=256, num_hidden_layers=3, initializer_range=0.08, **changes)
    torch.manual_seed(0)
    return K2ForCausalLM(config).eval()


def random_prompts(lengths, vocab=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def last_logits(model, seq) -> torch.Tensor:
    return model(torch.tensor([seq])).logits[0, -1].float()


GROUPS = {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3, "n_shared_experts": 2}


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": None}, {"rope_scaling": YARN}, GROUPS],
                         ids=["q_lora", "plain_q", "yarn", "groups_two_shared"])
def test_absorbed_decode_equals_full_forward(changes):
    """Prefill logits and every absorbed decode step match a full forward at that position (fp32)."""
    model = tiny_model(**changes)
    for _, moe in model.moe_layers():  # a router bias that changes which experts win
        moe.gate.e_score_correction_bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    engine = Engine(model, max_batch=4, max_seq_len=32)
    prompts = random_prompts([5, 12, 19])
    # non-contiguous slots (the cache is gathered), then slots 2, 3 (read as a view); three sequences run the
    # experts through grouped_mm, two through the loop over the experts in use
    slots = [2, 0, 3]
    seqs = [list(p) for p in prompts]
    logits = engine.prefill(slots, prompts)
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(logits[b], last_logits(model, seq), rtol=0, atol=1e-4)
    g = torch.Generator().manual_seed(2)
    for step in range(6):
        rows = [0, 1, 2] if step != 3 else [0, 2]  # one step with a sequence left out
        toks = torch.randint(2, 256, (len(rows),), generator=g).tolist()
        for b, t in zip(rows, toks):
            seqs[b].append(t)
        logits = engine.decode([slots[b] for b in rows], toks)
        for i, b in enumerate(rows):
            torch.testing.assert_close(logits[i], last_logits(model, seqs[b]), rtol=0, atol=1e-4)
    assert [engine.cache.lengths[s] for s in slots] == [len(s) for s in seqs]


def test_cache_holds_only_latent_and_rope_key():
    model = tiny_model()
    c = model.config
    engine = Engine(model, max_batch=3, max_seq_len=16)
    assert engine.cache.bytes_per_token_per_layer == (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    assert engine.cache.kv.nbytes == c.num_hidden_layers * 3 * 16 * (c.kv_lora_rank + c.qk_rope_head_dim) * 4


def test_cache_size_at_k2_dims():
    """K2: [c_kv 512 | k^R 64] in bf16 = 1,152 bytes per token per layer, 35.6x less than full MHA."""
    config = preset("k2").replace(num_hidden_layers=2)
    with torch.device("meta"):
        model = K2ForCausalLM(config).to(torch.bfloat16)
    engine = Engine(model, max_batch=2, max_seq_len=8)
    assert engine.cache.bytes_per_token_per_layer == 1152
    assert engine.cache.kv.shape == (2, 2, 8, 576)
    assert LatentCache(config, max_batch=1, max_seq_len=1, dtype=torch.bfloat16).kv.nbytes == 2 * 1152  # 2 layers
    mha = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * 2
    assert round(mha / 1152, 1) == 35.6


def test_greedy_equals_argmax_of_full_forwards():
    model = tiny_model(rope_scaling=YARN)
    engine = Engine(model, max_batch=2, max_seq_len=32)  # 3 prompts: two waves
    prompts = random_prompts([4, 9, 6])
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=7, stop_token_ids=()))
    for prompt, out in zip(prompts, outs):
        seq, expected, expected_lp = list(prompt), [], []
        for _ in range(7):
            logits = last_logits(model, seq)
            tok = int(logits.argmax())
            expected.append(tok)
            expected_lp.append(float(torch.log_softmax(logits, -1)[tok]))
            seq.append(tok)
        assert out.token_ids == expected
        assert out.logprobs == pytest.approx(expected_lp, abs=1e-4)
        assert out.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_batch_independent():
    model = tiny_model()
    prompts = random_prompts([3, 8, 5])
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7, stop_token_ids=())
    a = Engine(model, max_batch=4, max_seq_len=32).generate(prompts, params)
    b = Engine(model, max_batch=1, max_seq_len=32).generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for x, y in zip(a, b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
        assert all(lp <= 0 for lp in x.logprobs)
    c = Engine(model, max_batch=4, max_seq_len=32).generate(prompts, SamplingParams(
        max_new_tokens=8, temperature=1.0, top_p=0.95, seed=8, stop_token_ids=()))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_top_k_1_equals_greedy():
    model = tiny_model()
    engine = Engine(model, max_batch=4, max_seq_len=32)
    prompts = random_prompts([3, 8])
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=6, stop_token_ids=()))
    top1 = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.7, top_k=1, seed=3,
                                                   stop_token_ids=()))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]
    assert all(lp == 0 for o in top1 for lp in o.logprobs)  # the sampling distribution is a point mass
    raw = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.7, top_k=1, seed=3,
                                                  stop_token_ids=(), logprobs="raw"))
    for x, y in zip(raw, greedy):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


def test_stop_token_and_stop_string_end_early():
    model = tiny_model()
    engine = Engine(model, max_batch=4, max_seq_len=32)
    prompts = random_prompts([5, 7])
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=10, stop_token_ids=()))[0].token_ids
    stop = greedy[3]
    k = greedy.index(stop)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))
    assert outs[0].token_ids == greedy[: k + 1] and len(outs[0].logprobs) == k + 1
    assert (outs[0].finish_reason, outs[0].stop_reason) == ("stop", stop)
    with_text = engine.generate(prompts[:1], SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)),
                                decode=lambda ids: ",".join(map(str, ids)))[0]
    assert with_text.text == ",".join(map(str, greedy[:k]))  # the stop token is not in the text
    assert outs[1].finish_reason in ("stop", "length")

    def decode(ids):
        return "".join(f"<{i}>" for i in ids)

    stop_str = f"<{greedy[2]}>"
    k = greedy.index(greedy[2])
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=10, stop_token_ids=(), stop=(stop_str,)),
                           decode=decode)
    assert outs[0].token_ids == greedy[: k + 1]
    assert (outs[0].finish_reason, outs[0].stop_reason, outs[0].text) == ("stop", stop_str, decode(greedy[:k]))


def test_default_stop_is_eos_and_length_is_capped_by_the_cache():
    model = tiny_model()
    engine = Engine(model, max_batch=2, max_seq_len=12)
    prompt = random_prompts([10])[0]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=8, stop_token_ids=()))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"  # 10 cached + 2 fed back + 1 sampled
    eos = out.token_ids[1]
    model.config.eos_token_id = eos
    out = engine.generate([prompt], SamplingParams(max_new_tokens=8))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos


def test_bad_inputs_fail_loudly():
    engine = Engine(tiny_model(), max_batch=2, max_seq_len=8)
    with pytest.raises(ValueError, match="prompt lengths"):
        engine.generate([list(range(2, 12))])
    with pytest.raises(ValueError, match="prompt lengths"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[5, 999]])
    with pytest.raises(ValueError, match="decode function"):
        engine.generate([[5]], SamplingParams(stop=("x",)))
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"max_new_tokens": 0},
                {"logprobs": "all"}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_step_api_attributes_and_release():
    model = tiny_model()
    engine = Engine(model, max_batch=3, max_seq_len=16)
    assert (engine.max_batch, engine.max_seq_len, engine.vocab_size, engine.device) == (3, 16, 256, torch.device("cpu"))
    prompts = random_prompts([4, 6])
    engine.prefill([0, 1], prompts)
    engine.release([0])
    with pytest.raises(ValueError, match="never prefilled"):
        engine.decode([0, 1], [5, 6])
    torch.testing.assert_close(engine.decode([1], [5])[0], last_logits(model, prompts[1] + [5]), rtol=0, atol=1e-4)
    for bad in ([3], [1, 1], [-1]):
        with pytest.raises(ValueError, match="slots"):
            engine.decode(bad, [5] * len(bad))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.decode([1], [256])


def test_load_weights_replaces_weights_in_place(tmp_path):
    """After load_weights the engine computes exactly what a fresh engine on the new weights does."""
    engine = Engine(tiny_model(), max_batch=2, max_seq_len=32)
    torch.manual_seed(5)
    other = K2ForCausalLM(engine.config.replace(initializer_range=0.1)).eval()
    other.save_pretrained(tmp_path / "other")
    prompts = random_prompts([6, 9])
    before = engine.prefill([0, 1], prompts)
    engine.load_weights(tmp_path / "other")
    torch.testing.assert_close(engine.model.lm_head.weight, other.lm_head.weight, rtol=0, atol=0)
    fresh = Engine(other, max_batch=2, max_seq_len=32)
    for e in (engine, fresh):
        e.prefill([0, 1], prompts)
    assert not torch.allclose(before, fresh.prefill([0, 1], prompts))
    for tok in (7, 8, 9):  # the folded decode weights were refreshed too
        torch.testing.assert_close(engine.decode([0, 1], [tok, tok]), fresh.decode([0, 1], [tok, tok]),
                                   rtol=0, atol=1e-5)


def test_load_weights_refuses_another_architecture(tmp_path):
    engine = Engine(tiny_model(), max_batch=2, max_seq_len=32)
    K2ForCausalLM(engine.config.replace(num_attention_heads=2)).save_pretrained(tmp_path / "two_heads")
    with pytest.raises(ValueError, match="num_attention_heads"):
        engine.load_weights(tmp_path / "two_heads")


def test_bf16_decode_follows_the_bf16_model():
    """Nothing fp32-only: a bf16 model decodes in bf16 (router and softmax in fp32) close to its own forward."""
    model = tiny_model().to(torch.bfloat16)
    engine = Engine(model, max_batch=2, max_seq_len=32)
    assert engine.cache.kv.dtype == torch.bfloat16
    prompts = random_prompts([5, 8])
    engine.prefill([0, 1], prompts)
    logits = engine.decode([0, 1], [7, 7])
    assert logits.dtype == torch.float32
    for b, p in enumerate(prompts):
        expected = last_logits(model, p + [7])
        assert (logits[b] - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.slow
def test_compiled_decode_equals_eager(tmp_path):
    """compile=True: the same logits as the eager step, while the cache grows, the batch changes and weights load."""
    eager = Engine(tiny_model(rope_scaling=YARN), max_batch=4, max_seq_len=48)
    compiled = Engine(tiny_model(rope_scaling=YARN), max_batch=4, max_seq_len=48, compile=True)
    torch.manual_seed(6)
    K2ForCausalLM(eager.config.replace(initializer_range=0.1)).save_pretrained(tmp_path)
    check_same_decodes(eager, compiled, tmp_path, ([1], [0, 2, 3], [3, 1]), steps=12, atol=1e-4)


def check_same_decodes(reference: Engine, other: Engine, new_weights, slot_sets, steps: int, atol: float) -> None:
    """Prefill and decode the same tokens on both engines, slot set by slot set; before the last set both load
    `new_weights` (the other engine must see them). Every step's logits must agree."""
    prompts = random_prompts([5, 9, 3, 7, 4])
    g = torch.Generator().manual_seed(4)
    for slots in slot_sets:
        if slots is slot_sets[-1]:
            for e in (reference, other):
                e.load_weights(new_weights)
        for e in (reference, other):
            e.prefill(slots, prompts[: len(slots)])
        for _ in range(steps):
            toks = torch.randint(2, 256, (len(slots),), generator=g).tolist()
            torch.testing.assert_close(other.decode(slots, toks), reference.decode(slots, toks), rtol=0, atol=atol)


def test_oneDNN_packed_decode_equals_the_plain_one(tmp_path, monkeypatch):
    """pack=True (CPU, fp32): every decode matrix prepacked for oneDNN, LM head included, gives the plain step's
    logits, and load_weights repacks the new weights."""
    from openk2.serve import engine as engine_module
    from openk2.serve.packed_linear import packing_available

    model = tiny_model()
    if not packing_available(model.lm_head.weight):
        pytest.skip("this torch build has no oneDNN linear prepacking")
    monkeypatch.setattr(engine_module, "PACK_MIN_BYTES", 0)  # pack even the tiny test model's small matrices
    plain, packed = Engine(tiny_model(), max_batch=4, max_seq_len=32, pack=False), Engine(model, max_batch=4,
                                                                                          max_seq_len=32, pack=True)
    assert packed.weights.packed_lm_head is not None and plain.weights.packed_lm_head is None
    attn, dense = packed.weights.layers[0]
    assert set(attn.packed) == {"w_a", "w_q", "w_o"} and set(dense.packed) == {"w_gu", "w_d"}
    torch.manual_seed(6)
    K2ForCausalLM(plain.config.replace(initializer_range=0.1)).save_pretrained(tmp_path)
    check_same_decodes(plain, packed, tmp_path, ([1], [0, 2, 3]), steps=6, atol=1e-4)


def test_gathered_experts_equal_the_grouped_ones():
    """The sync-free expert path (each row gathers its expert's matrices) computes what the grouped one does."""
    from openk2.serve.engine import expert_swiglu, gathered_swiglu

    g = torch.Generator().manual_seed(0)
    X, H, I = 5, 16, 8
    w_gu, w_d = torch.randn(X, H, 2 * I, generator=g), torch.randn(X, I, H, generator=g)
    for counts in ([0, 3, 0, 2, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 4], [2, 0, 7, 0, 3]):  # loop and grouped_mm paths
        ends = torch.tensor(counts).cumsum(0).to(torch.int32)
        rows, scale = torch.randn(sum(counts), H, generator=g), torch.rand(sum(counts), generator=g)
        torch.testing.assert_close(gathered_swiglu(rows, w_gu, w_d, ends, scale),
                                   expert_swiglu(rows, w_gu, w_d, ends, scale), rtol=1e-5, atol=1e-5)


def test_padded_full_length_step_equals_the_engine_step():
    """What a CUDA graph replays: the batch padded to its bucket by repeating a row, attention over the whole cache
    length under the mask, slots gathered. Same logits for the real rows; the cache ends up as the engine's."""
    from openk2.serve.engine import decode_step, padded_decode_inputs

    model = tiny_model()
    engine = Engine(model, max_batch=8, max_seq_len=24)
    slots = [4, 1, 6]
    engine.prefill(slots, random_prompts([5, 11, 2]))
    for tokens in ([9, 20, 31], [40, 41, 42]):
        positions = [engine.cache.lengths[s] for s in slots]
        kv = engine.cache.kv.clone()
        ids, slot_idx, pos = torch.tensor(padded_decode_inputs(tokens, slots, positions, 4))
        assert slot_idx.tolist() == slots + slots[:1]
        static = decode_step(engine.weights, kv, ids, slot_idx, pos, None, engine.max_seq_len)
        logits = engine.decode(slots, tokens)
        torch.testing.assert_close(static[:3], logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(kv, engine.cache.kv, rtol=0, atol=1e-5)  # other shapes, other roundings


def test_cuda_graphs_need_a_cuda_model():
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        Engine(tiny_model(), max_batch=2, max_seq_len=16, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(dtype, tmp_path):
    """cuda_graphs=True: the eager step's logits through bucket changes, a refreshed cache slot and new weights."""
    eager = Engine(tiny_model().to("cuda", dtype), max_batch=8, max_seq_len=48)
    graphed = Engine(tiny_model().to("cuda", dtype), max_batch=8, max_seq_len=48, cuda_graphs=True)
    torch.manual_seed(6)
    K2ForCausalLM(eager.config.replace(initializer_range=0.1)).save_pretrained(tmp_path)
    # buckets 1, 4 and 8, then bucket 2 recaptured on the new weights
    check_same_decodes(eager, graphed, tmp_path, ([1], [0, 2, 3], [7, 1, 4, 2, 5], [3, 1]), steps=10,
                       atol=1e-4 if dtype == torch.float32 else 5e-2)
