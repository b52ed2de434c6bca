import io

import pytest
import torch
from torch import nn

from openk2 import K2ForCausalLM, preset
from openk2.optim import MuonClip, split_parameters
from tests.ranks import run_on_ranks


def tiny_config(**changes):
    return preset("tiny").replace(vocab_size=128, num_hidden_layers=2, n_routed_experts=4, **changes)


def batches(n, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(n)]


# ----------------------------------------------------------------------------- the split
def test_split_places_every_trainable_parameter_once():
    model = K2ForCausalLM(tiny_config())
    muon, adam = (dict(group) for group in split_parameters(model))
    assert set(muon) | set(adam) == {n for n, _ in model.named_parameters()} and not set(muon) & set(adam)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.self_attn.kv_a_layernorm.weight", "model.layers.0.input_layernorm.weight"):
        assert name in adam
    for name in ("model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.down_proj",
                 "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.1.self_attn.kv_b_proj.weight"):
        assert name in muon
    assert not any("e_score_correction_bias" in n for n in (*muon, *adam))  # a buffer: no optimizer


def test_groups_have_their_own_lr_and_follow_a_scheduler():
    model = K2ForCausalLM(tiny_config())
    opt = MuonClip(model, lr=0.02, adamw_lr=3e-3, weight_decay=0.1, adamw_weight_decay=0.0)
    muon, adam = opt.param_groups
    assert muon["use_muon"] and (muon["lr"], muon["weight_decay"]) == (0.02, 0.1)
    assert not adam["use_muon"] and (adam["lr"], adam["weight_decay"]) == (3e-3, 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 1.5e-3]
    del sched


def test_recording_is_switched_on_and_the_router_bias_is_left_alone():
    model = K2ForCausalLM(tiny_config())
    attn = [layer.self_attn for layer in model.model.layers]
    assert not any(a.record_max_logits for a in attn)
    opt = MuonClip(model, lr=0.02)
    assert all(a.record_max_logits for a in attn)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    bias.fill_(0.25)
    ids = batches(1)[0]
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert torch.all(bias == 0.25) and all(a.max_logits is None for a in attn)  # S_max reset after the step
    opt.qk_clip.stop()
    assert not any(a.record_max_logits for a in attn)


# ----------------------------------------------------------------------------- misconfiguration
def test_no_attention_layers():
    with pytest.raises(ValueError, match="no attention layers"):
        MuonClip(nn.Sequential(nn.Linear(4, 4)), lr=0.02)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_tau(tau):
    model = K2ForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="qk_clip_tau"):
        MuonClip(model, lr=0.02, qk_clip_tau=tau)
    assert not any(layer.self_attn.record_max_logits for layer in model.model.layers)  # no half-built state


@pytest.mark.parametrize("extra, shape", [("conv", (2, 3, 4, 4)), ("odd_stack", (2, 3, 4))])
def test_unplaceable_parameter_is_named(extra, shape):
    model = K2ForCausalLM(tiny_config())
    model.model.register_parameter(extra, nn.Parameter(torch.zeros(shape)))
    with pytest.raises(ValueError, match=f"'model.{extra}'"):
        MuonClip(model, lr=0.02)


def test_bad_adamw_settings():
    with pytest.raises(ValueError, match="adamw_lr"):
        MuonClip(K2ForCausalLM(tiny_config()), lr=0.02, adamw_lr=-1.0)
    with pytest.raises(ValueError, match="adamw_betas"):
        MuonClip(K2ForCausalLM(tiny_config()), lr=0.02, adamw_betas=(0.9, 1.0))


# ----------------------------------------------------------------------------- resume
def train(model, opt, data):
    for ids in data:
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_resume_is_bit_exact():
    torch.manual_seed(0)
    config = tiny_config()
    data = batches(6)
    # τ below the initial logits, so that heads are clipped and the counters matter
    model = K2ForCausalLM(config)
    opt = MuonClip(model, lr=0.02, qk_clip_tau=0.12)
    train(model, opt, data[:3])
    assert 0 < opt.clip_stats.ever_clipped_fraction
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    train(model, opt, data[3:])

    torch.manual_seed(123)  # a different init, all of it overwritten by the checkpoint
    resumed = K2ForCausalLM(config)
    opt2 = MuonClip(resumed, lr=0.02, qk_clip_tau=0.12)
    buf.seek(0)
    ckpt = torch.load(buf)  # weights_only: the optimizer state is plain tensors and numbers
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    assert opt2.qk_clip.step == 3
    train(resumed, opt2, data[3:])

    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert opt.qk_clip.step == opt2.qk_clip.step == 6
    assert all(torch.equal(a, b) for a, b in zip(opt.qk_clip.clip_counts, opt2.qk_clip.clip_counts))
    assert opt.clip_stats.metrics() == opt2.clip_stats.metrics()
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k][f], s2[k][f]) for k in s1 for f in s1[k])


def test_bf16_model_trains():
    model = K2ForCausalLM(tiny_config()).to(torch.bfloat16)
    opt = MuonClip(model, lr=0.02, qk_clip_tau=0.12)
    train(model, opt, batches(2))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(s["momentum_buffer"].dtype == torch.bfloat16 for s in opt.state.values() if "momentum_buffer" in s)


# ----------------------------------------------------------------------------- data parallel
def _dp_worker(rank, world) -> bool:
    torch.manual_seed(0)
    model = K2ForCausalLM(tiny_config())
    opt = MuonClip(model, lr=0.0, qk_clip_tau=1e9)  # lr 0, no clip: only the reduction is observed
    ids = batches(1, seed=10 + rank)[0]  # each rank its own batch
    model(ids, labels=ids).loss.backward()
    local = torch.stack([layer.self_attn.max_logits for layer in model.model.layers])
    gathered = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(gathered, local)
    opt.step()
    ok = torch.equal(torch.stack(opt.clip_stats.max_logits), torch.stack(gathered).amax(0))
    return ok and not torch.equal(gathered[0], gathered[1])


@pytest.mark.slow
def test_s_max_is_all_reduced_with_max_across_ranks(tmp_path):
    assert run_on_ranks(_dp_worker, tmp_path) == [True, True]
