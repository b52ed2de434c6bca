import pytest
import torch
import torch.nn.functional as F

from openk2 import K2ForCausalLM, preset
from openk2.model.model import Experts, MoE, MultiHeadLatentAttention, rope_cos_sin


def small_config(**changes):
    return preset("tiny").replace(vocab_size=256, num_hidden_layers=3, **changes)


def test_forward_shapes_and_loss():
    config = small_config()
    model = K2ForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (3, 17))
    out = model(ids)
    assert out.logits.shape == (3, 17, config.vocab_size) and out.loss is None
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, config.vocab_size), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_grouped_experts_equal_dense_reference():
    """Sorting tokens by expert gives what running every expert on every token and masking gives."""
    config = small_config()
    experts = Experts(config)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    n, k, e = 40, config.num_experts_per_tok, config.n_routed_experts
    x = torch.randn(n, config.hidden_size)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    w = torch.rand(n, k)
    got = experts(x, w, idx)
    dense = torch.stack([
        (F.silu(x @ experts.gate_proj[j].T) * (x @ experts.up_proj[j].T)) @ experts.down_proj[j].T for j in range(e)
    ], dim=1)  # (n, E, H)
    mix = torch.zeros(n, e).scatter_(1, idx, w)
    torch.testing.assert_close(got, torch.einsum("ne,neh->nh", mix, dense), rtol=1e-5, atol=1e-5)


def test_router_records_loads_only_in_training():
    config = small_config()
    model = K2ForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    model.eval()
    model(ids)
    assert all(moe.gate.tokens_per_expert.sum() == 0 for _, moe in model.moe_layers())
    model.train()
    model(ids)
    for _, moe in model.moe_layers():
        assert moe.gate.tokens_per_expert.sum() == 2 * 16 * config.num_experts_per_tok


def test_aux_loss_free_bias_update():
    config = small_config()
    model = K2ForCausalLM(config).train()
    out = model(torch.randint(0, config.vocab_size, (4, 32)), labels=torch.randint(0, config.vocab_size, (4, 32)))
    out.loss.backward()
    layer_loads = [moe.gate.tokens_per_expert.clone() for _, moe in model.moe_layers()]
    for _, moe in model.moe_layers():
        assert not moe.gate.e_score_correction_bias.requires_grad
        assert "e_score_correction_bias" not in dict(model.named_parameters())
    stats = model.update_expert_bias(gamma=0.01)
    for (_, moe), load, ratio in zip(model.moe_layers(), layer_loads, stats["load_max_over_mean"]):
        expected = 0.01 * torch.sign(load.mean() - load)
        torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)
        assert ratio == pytest.approx((load.max() / load.mean()).item())
        assert moe.gate.tokens_per_expert.sum() == 0  # consumed


def test_bias_update_balances_a_skewed_router():
    """Repeated updates move load from hot experts to cold ones (DeepSeek-V3 §2.1.2)."""
    config = small_config()
    model = K2ForCausalLM(config).train()
    _, moe = model.moe_layers()[0]
    with torch.no_grad():
        moe.gate.weight[:2] += 0.5  # two experts win almost every token
    x = torch.randn(512, config.hidden_size)
    moe.gate(x)
    start = model.update_expert_bias(gamma=0.02)["load_max_over_mean"][0]
    for _ in range(60):
        moe.gate(x)
        end = model.update_expert_bias(gamma=0.02)["load_max_over_mean"][0]
    assert end < start / 2


def test_sequence_balance_loss_added_when_on():
    config = small_config(aux_loss_alpha=1e-2)
    model = K2ForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce + out.aux_loss)
    # eq. 17-20 by hand for the first MoE layer: balanced routing gives α·k-independent value 1·α
    moe = model.moe_layers()[0][1]
    B, T, E, k = 2, 16, config.n_routed_experts, config.num_experts_per_tok
    scores = torch.full((B, T, E), 0.5)
    idx = torch.arange(T * k).remainder(E).repeat(B, 1)
    assert moe.sequence_balance_loss(scores, idx).item() == pytest.approx(1e-2)
    assert K2ForCausalLM(small_config()).train()(ids, labels=ids).aux_loss is None  # off by default


@pytest.mark.parametrize("bad", [256, 1000, -1])
def test_token_ids_outside_vocab_are_one_clear_error(bad):
    model = K2ForCausalLM(small_config())
    ids = torch.zeros(1, 4, dtype=torch.long)
    ids[0, 2] = bad
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary \\[0, 256\\)"):
        model(ids)


def test_recorded_max_logits_equal_explicit_logits():
    config = small_config()
    attn = MultiHeadLatentAttention(config)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.ndim == 2 else None
    x = torch.randn(2, 12, config.hidden_size)
    cos, sin = rope_cos_sin(config, torch.arange(12)[None], x.dtype)
    plain = attn(x, cos, sin)
    attn.record_max_logits = True
    recorded = attn(x, cos, sin)
    torch.testing.assert_close(plain, recorded, rtol=1e-5, atol=1e-5)
    # recompute the logits from the weights
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))).view(2, 12, config.num_attention_heads, -1)
    ckv, kr = attn.kv_a_proj_with_mqa(x).split([config.kv_lora_rank, config.qk_rope_head_dim], -1)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(ckv)).view(2, 12, config.num_attention_heads, -1)
    from openk2.model.model import apply_rope
    qn, qr = q.split([config.qk_nope_head_dim, config.qk_rope_head_dim], -1)
    kn = kv[..., : config.qk_nope_head_dim]
    qr, kr = apply_rope(qr, cos, sin), apply_rope(kr[:, :, None], cos, sin)
    logits = torch.einsum("bthd,bshd->bhts", qn, kn) + torch.einsum("bthd,bsd->bhts", qr, kr[:, :, 0])
    logits = logits * config.softmax_scale
    logits = logits.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(attn.max_logits, logits.amax(dim=(0, 2, 3)))


def test_moe_layers_follow_first_k_dense_replace():
    model = K2ForCausalLM(small_config(first_k_dense_replace=2))
    assert [i for i, _ in model.moe_layers()] == [2]
    assert not isinstance(model.model.layers[1].mlp, MoE)
