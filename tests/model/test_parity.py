"""Logit parity with transformers' DeepseekV3ForCausalLM through hub-layout checkpoints, both directions."""

import pytest
import torch

from openk2 import K2ForCausalLM, preset

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

YARN_K2 = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 64, "beta_fast": 1.0,
           "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
YARN_V2 = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
           "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.8}
CONFIGS = {
    "q_lora": {},
    "no_q_lora": {"q_lora_rank": None},
    "n_group": {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3},
    "yarn_k2": {"rope_scaling": YARN_K2},
    "yarn_v2_all": {"rope_scaling": YARN_V2, "q_lora_rank": None, "n_group": 2, "topk_group": 1},
}


def tiny_config(**changes):
    # a larger init than training uses, so logits and routing are far from trivial
    return preset("tiny").replace(vocab_size=512, initializer_range=0.08, **changes)


def randomize_bias(buffers, std=0.3):
    for b in buffers:
        b.normal_(0, std)


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_to_transformers(tmp_path, name):
    config = tiny_config(**CONFIGS[name])
    ours = K2ForCausalLM(config).eval()
    randomize_bias(moe.gate.e_score_correction_bias for _, moe in ours.moe_layers())
    ours.save_pretrained(tmp_path)
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 48))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert a.std() > 0.1  # not a trivially small signal
    assert max_diff(a, b) <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_to_ours(tmp_path, name):
    config = tiny_config(**CONFIGS[name])
    theirs = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(config.to_hf(complete=True))).eval()
    randomize_bias(layer.mlp.gate.e_score_correction_bias for layer in theirs.model.layers[1:])
    theirs.save_pretrained(tmp_path)
    ours = K2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, config.vocab_size, (2, 48))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert a.std() > 0.02
    assert max_diff(a, b) <= 1e-4


def test_bias_changes_selection_but_not_mixing_weights():
    """The parity configs exercise the case the spec singles out: selection ≠ mixing."""
    config = tiny_config()
    router = K2ForCausalLM(config).moe_layers()[0][1].gate
    router.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(64, config.hidden_size)
    weights, idx, scores = router(x)
    unbiased_idx = scores.topk(config.num_experts_per_tok, dim=-1).indices
    assert (idx.sort().values != unbiased_idx.sort().values).any()
    expected = scores.gather(1, idx)
    expected = expected / expected.sum(-1, keepdim=True) * config.routed_scaling_factor
    torch.testing.assert_close(weights, expected)


def test_loss_matches_transformers(tmp_path):
    config = tiny_config()
    ours = K2ForCausalLM(config).eval()
    ours.save_pretrained(tmp_path)
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 32))
    labels = ids.clone()
    labels[0, :10] = -100
    with torch.no_grad():
        assert abs(ours(ids, labels=labels).loss.item() - theirs(ids, labels=labels).loss.item()) < 1e-5
