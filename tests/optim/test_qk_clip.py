import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from openk2 import K2ForCausalLM, ModelConfig
from openk2.optim import MuonClip
from openk2.optim.qk_clip import GQAClipTarget, MLAClipTarget, find_clip_targets

TAU = 100.0


# ----------------------------------------------------------------------------- a recording MHA/GQA model
class GQAAttention(nn.Module):
    """Causal MHA/GQA that records per-head max logits with MultiHeadLatentAttention's protocol."""

    def __init__(self, hidden: int, num_heads: int, num_key_value_heads: int, head_dim: int, bias: bool = False):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = num_heads, num_key_value_heads, head_dim
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, num_key_value_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, num_key_value_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)
        self.record_max_logits = False
        self.max_logits = None

    def forward(self, x):
        B, T, _ = x.shape
        H, KV, d = self.num_heads, self.num_key_value_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, KV, d).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        v = self.v_proj(x).view(B, T, KV, d).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        logits = (q @ k.mT) * d**-0.5
        logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
        if self.record_max_logits:
            m = logits.detach().amax(dim=(0, 2, 3)).float()
            self.max_logits = m if self.max_logits is None else torch.maximum(self.max_logits, m)
        y = torch.softmax(logits, dim=-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * d))

    def reset_max_logits(self):
        self.max_logits = None


class TinyGQALM(nn.Module):
    def __init__(self, n_layers=2, hidden=64, heads=4, kv_heads=4, head_dim=16, bias=False, vocab=97):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(GQAAttention(hidden, heads, kv_heads, head_dim, bias) for _ in range(n_layers))
        self.norm = nn.RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids, labels=None):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = x + layer(x)
        logits = self.lm_head(self.norm(x))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()) if labels is not None else None
        return type("Out", (), {"logits": logits, "loss": loss})


def mla_config(q_lora_rank):
    """K2's MLA head dims (nope 128, rope 64, v 128, kv_lora 512) and its YaRN softmax scale, few heads."""
    return ModelConfig(vocab_size=97, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, q_lora_rank=q_lora_rank, n_routed_experts=0)


# ----------------------------------------------------------------------------- helpers
def attention_modules(model):
    return [t.module for t in find_clip_targets(model)]


def layer_inputs(model, ids):
    """Each attention module's inputs in a forward on `ids`, so that its logits can be recomputed on them alone
    (clipping layer 0 changes what layer 1 sees in a full forward). Grad is on, as in training, so that the
    attention path (eager while recording) and hence every layer's inputs are the training forward's."""
    captured = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: captured.append((mod, tuple(a.detach() for a in args))))
             for m in attention_modules(model)]
    model(ids)
    for h in hooks:
        h.remove()
    return captured


def s_max_on(inputs):
    """(L, H) S_max of each attention module on its captured inputs, through the modules' own recording
    (with grad enabled, as in training: a module may skip recording in no-grad evaluation forwards)."""
    out = []
    for module, args in inputs:
        module.record_max_logits = True
        module.reset_max_logits()
        with torch.enable_grad():
            module(*args)
        out.append(module.max_logits.clone())
        module.reset_max_logits()
    return torch.stack(out)


def recorded_s_max(model, ids):
    return s_max_on(layer_inputs(model, ids))


def q_rows(module):
    """(H, rows per head, in) view of the query projection."""
    if hasattr(module, "kv_b_proj"):
        w = module.q_proj.weight if module.q_lora_rank is None else module.q_b_proj.weight
        return w.view(module.n_heads, module.d_nope + module.d_rope, -1)
    return module.q_proj.weight.view(module.num_heads, module.head_dim, -1)


@torch.no_grad()
def force_over_tau(model, ids, heads, factor=3.0):
    """Scale the query rows of `heads` [(layer, head)] so that their S_max becomes factor·τ.

    Returns the layer inputs of a forward on `ids` with the forced weights, and the (L, H) S_max on them.
    """
    modules = attention_modules(model)
    for layer, head in heads:
        s = recorded_s_max(model, ids)[layer, head]
        assert s > 0
        q_rows(modules[layer])[head].mul_(factor * TAU / s)
        if getattr(getattr(modules[layer], "q_proj", None), "bias", None) is not None:
            modules[layer].q_proj.bias.view(modules[layer].num_heads, -1)[head].mul_(factor * TAU / s)
    inputs = layer_inputs(model, ids)
    return inputs, s_max_on(inputs)


def train_step_lr0(model, ids, **kwargs):
    opt = MuonClip(model, lr=0.0, qk_clip_tau=TAU, **kwargs)
    model(ids, labels=ids).loss.backward()
    opt.step()
    return opt


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("q_lora_rank", [64, None])
def test_mla_clip_is_exact(q_lora_rank):
    torch.manual_seed(0)
    config = mla_config(q_lora_rank)
    model = K2ForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 24))
    clipped = [(0, 1), (1, 0), (1, 3)]
    inputs, before = force_over_tau(model, ids, clipped)
    assert (before[tuple(zip(*clipped))] > TAU).all() and (before.flatten().sort().values[:-3] < TAU).all()
    w0 = snapshot(model)
    opt = train_step_lr0(model, ids)
    after = s_max_on(inputs)

    mask = torch.zeros_like(before, dtype=torch.bool)
    mask[tuple(zip(*clipped))] = True
    torch.testing.assert_close(after[mask], torch.full((3,), TAU), rtol=1e-5, atol=0)
    assert torch.equal(after[~mask], before[~mask])  # bit-identical logits for every other head

    d_nope, d_rope, d_v, H = 128, 64, 128, 4
    q_key = "self_attn.q_proj.weight" if q_lora_rank is None else "self_attn.q_b_proj.weight"
    for layer in range(2):
        p = f"model.layers.{layer}."
        w1 = model.state_dict()
        q0, q1 = (w[p + q_key].view(H, d_nope + d_rope, -1) for w in (w0, w1))
        kv0, kv1 = (w[p + "self_attn.kv_b_proj.weight"].view(H, d_nope + d_v, -1) for w in (w0, w1))
        assert torch.equal(kv1[:, d_nope:], kv0[:, d_nope:])  # v rows: all heads
        assert torch.equal(w1[p + "self_attn.kv_a_proj_with_mqa.weight"], w0[p + "self_attn.kv_a_proj_with_mqa.weight"])
        for h in range(H):
            if (layer, h) not in clipped:
                assert torch.equal(q1[h], q0[h]) and torch.equal(kv1[h], kv0[h])
                continue
            gamma = TAU / before[layer, h]
            torch.testing.assert_close(q1[h, :d_nope], q0[h, :d_nope] * gamma.sqrt())  # q^C
            torch.testing.assert_close(q1[h, d_nope:], q0[h, d_nope:] * gamma)  # q^R: all of γ
            torch.testing.assert_close(kv1[h, :d_nope], kv0[h, :d_nope] * gamma.sqrt())  # k^C
    untouched = [k for k in w0 if "q_b_proj" not in k and "q_proj" not in k and "kv_b_proj" not in k]
    assert all(torch.equal(w0[k], model.state_dict()[k]) for k in untouched)  # lr = 0: nothing else moved
    assert opt.clip_stats.clipped_fraction == 3 / 8


@pytest.mark.parametrize("kv_heads, bias", [(4, True), (2, False)], ids=["mha_bias", "gqa"])
def test_mha_gqa_clip_is_exact(kv_heads, bias):
    torch.manual_seed(0)
    model = TinyGQALM(heads=4, kv_heads=kv_heads, bias=bias)
    ids = torch.randint(0, 97, (2, 24))
    forced = [(0, 1), (1, 2)]
    inputs, before = force_over_tau(model, ids, forced)
    w0 = snapshot(model)
    train_step_lr0(model, ids)
    after = s_max_on(inputs)

    group = 4 // kv_heads
    for layer in range(2):
        for h in range(4):
            g = slice(h // group * group, h // group * group + group)
            group_max = before[layer, g].max()
            if group_max <= TAU:  # a group with no head over τ: bit-identical
                assert torch.equal(after[layer, h], before[layer, h])
                q0 = w0[f"layers.{layer}.q_proj.weight"].view(4, 16, -1)[h]
                assert torch.equal(q_rows(model.layers[layer])[h], q0)
                k0 = w0[f"layers.{layer}.k_proj.weight"].view(kv_heads, 16, -1)[h // group]
                assert torch.equal(model.layers[layer].k_proj.weight.view(kv_heads, 16, -1)[h // group], k0)
            else:  # every head of a clipped group is scaled by the group's γ; its max lands on τ
                torch.testing.assert_close(after[layer, h], before[layer, h] * TAU / group_max, rtol=1e-5, atol=0)
        if kv_heads < 4:
            torch.testing.assert_close(after[layer].view(kv_heads, -1).amax(1).clamp_max(TAU),
                                       torch.minimum(before[layer].view(kv_heads, -1).amax(1), torch.tensor(TAU)),
                                       rtol=1e-5, atol=0)
    for k in w0:
        if "v_proj" in k or "o_proj" in k:
            assert torch.equal(w0[k], model.state_dict()[k])


# ----------------------------------------------------------------------------- telemetry
def test_telemetry_counts_and_log_only_mode():
    torch.manual_seed(0)
    config = mla_config(64)
    model = K2ForCausalLM(config)
    ids_a, ids_b = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    force_over_tau(model, torch.cat([ids_a, ids_b]), [(1, 2)])
    s_a, s_b = recorded_s_max(model, ids_a), recorded_s_max(model, ids_b)

    log_only = MuonClip(model, lr=0.0, qk_clip_tau=None)
    w0 = snapshot(model)
    for ids in (ids_a, ids_b):  # two micro-batches, one step: S_max is the max over both
        (model(ids, labels=ids).loss / 2).backward()
    log_only.step()
    stats = log_only.clip_stats
    assert torch.equal(torch.stack(stats.max_logits), torch.maximum(s_a, s_b))
    assert stats.layers == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert stats.clipped_fraction == 0 and stats.min_gamma == 1.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in w0.items())  # nothing rescaled
    log_only.qk_clip.stop()

    opt = MuonClip(model, lr=0.0, qk_clip_tau=TAU)
    model(ids_a, labels=ids_a).loss.backward()
    opt.step()
    m = opt.clip_stats.metrics()
    assert m["qk_clip/clipped_fraction"] == 1 / 8 and m["qk_clip/ever_clipped_fraction"] == 1 / 8
    assert m["qk_clip/min_gamma"] == pytest.approx(TAU / float(s_a[1, 2]), rel=1e-6)
    assert m["qk_clip/max_logit"] == pytest.approx(float(s_a.max()))
    opt.zero_grad()
    model(ids_a, labels=ids_a).loss.backward()
    opt.step()  # now at τ (within rounding), so no head is over it
    stats = opt.clip_stats
    assert stats.step == 2 and stats.clipped_fraction <= 1 / 8 and stats.ever_clipped_fraction == 1 / 8
    assert torch.stack(stats.max_logits).max() == pytest.approx(TAU, rel=1e-5)


def test_step_without_forward_clips_nothing():
    model = TinyGQALM()
    opt = MuonClip(model, lr=0.01)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.clip_stats.clipped_fraction == 0 and all(torch.isinf(m).all() for m in opt.clip_stats.max_logits)


def test_adapters_found():
    targets = find_clip_targets(TinyGQALM(kv_heads=2))
    assert [type(t) for t in targets] == [GQAClipTarget] * 2 and targets[0].n_kv_heads == 2
    assert all(isinstance(t, MLAClipTarget) for t in find_clip_targets(K2ForCausalLM(mla_config(None))))


def test_qk_norm_attention_is_refused():
    model = TinyGQALM()
    model.layers[0].q_norm = nn.RMSNorm(16)
    with pytest.raises(ValueError, match="layers.0"):
        MuonClip(model, lr=0.01)
