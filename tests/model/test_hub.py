import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from openk2 import K2ForCausalLM, preset
from openk2.model.hub import INDEX_NAME


def config(**changes):
    return preset("tiny").replace(vocab_size=256, num_hidden_layers=2, **changes)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_load_round_trip_is_exact(tmp_path):
    model = K2ForCausalLM(config())
    model.moe_layers()[0][1].gate.e_score_correction_bias.normal_()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys
    loaded = K2ForCausalLM.from_pretrained(tmp_path)
    assert_same_weights(model, loaded)
    assert loaded.config == model.config


def test_sharded_save_writes_an_index(tmp_path):
    model = K2ForCausalLM(config())
    model.save_pretrained(tmp_path, max_shard_bytes=1_000_000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == 4 * model.num_parameters()
    assert_same_weights(model, K2ForCausalLM.from_pretrained(tmp_path))


def test_resave_replaces_old_shards_and_keeps_other_files(tmp_path):
    model = K2ForCausalLM(config())
    model.save_pretrained(tmp_path, max_shard_bytes=1_000_000)
    (tmp_path / "tokenizer.json").write_text("{}")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}*"))  # no temp folders left behind


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    K2ForCausalLM(config()).save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        K2ForCausalLM.from_pretrained(tmp_path)


def test_misshaped_tensor_is_named(tmp_path):
    K2ForCausalLM(config()).save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(3, 64)}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.kv_b_proj\.weight'.*\(3, 64\)"):
        K2ForCausalLM.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named_but_mtp_layers_are_skipped(tmp_path):
    model = K2ForCausalLM(config())
    model.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.2.eh_proj.weight": torch.zeros(2, 2)}))  # MTP layer
    assert_same_weights(model, K2ForCausalLM.from_pretrained(tmp_path))
    _rewrite(tmp_path, lambda t: t.update({"model.decoy.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected tensors .*model.decoy.weight"):
        K2ForCausalLM.from_pretrained(tmp_path)


def test_reads_transformers_fused_expert_layout(tmp_path):
    """transformers >= 5 writes experts fused (gate_up_proj) when it cannot map them back, e.g. kimi_k2."""
    model = K2ForCausalLM(config())
    model.save_pretrained(tmp_path)

    def fuse(t):
        prefix = "model.layers.1.mlp.experts"
        e = model.config.n_routed_experts
        gate = torch.stack([t.pop(f"{prefix}.{j}.gate_proj.weight") for j in range(e)])
        up = torch.stack([t.pop(f"{prefix}.{j}.up_proj.weight") for j in range(e)])
        t[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        t[f"{prefix}.down_proj"] = torch.stack([t.pop(f"{prefix}.{j}.down_proj.weight") for j in range(e)])

    _rewrite(tmp_path, fuse)
    assert_same_weights(model, K2ForCausalLM.from_pretrained(tmp_path))


def test_bf16_load_keeps_router_in_fp32(tmp_path):
    K2ForCausalLM(config()).save_pretrained(tmp_path)
    model = K2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    gate = model.moe_layers()[0][1].gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
