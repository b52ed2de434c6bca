import json
import time

import pytest
import torch

from openk2 import K2ForCausalLM, ModelConfig, preset

HUB_CONFIGS = ["kimi_k2.json", "deepseek_v3.json", "moonlight_16b_a3b.json", "deepseek_v2_lite.json"]


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_config_round_trips_unchanged(fixtures, name):
    raw = json.loads((fixtures / "configs" / name).read_text())
    config = ModelConfig.from_hf(raw)
    assert config.to_hf() == raw
    assert list(config.to_hf()) == list(raw)  # key order kept too
    assert ModelConfig.from_hf(fixtures / "configs" / name).to_hf() == raw  # from a path


def test_transformers_v5_rope_parameters_round_trip():
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    raw = preset("tiny").replace(rope_scaling=yarn).to_hf()
    raw["rope_parameters"] = {**raw.pop("rope_scaling"), "rope_theta": raw.pop("rope_theta"), "rope_type": "yarn"}
    config = ModelConfig.from_hf(raw)
    assert config.rope_theta == 50000.0 and config.yarn["factor"] == 4.0
    assert config.to_hf() == raw


def test_kimi_k2_parameter_count(fixtures):
    config = ModelConfig.from_hf(fixtures / "configs" / "kimi_k2.json")
    assert config.num_parameters() == 1_026_408_232_448
    assert config.num_parameters(active=True) == 32_861_500_928  # "about 32.86B" (spec §1)
    assert config == preset("k2")


def test_deepseek_v3_parameter_count(fixtures):
    config = ModelConfig.from_hf(fixtures / "configs" / "deepseek_v3.json")
    assert round(config.num_parameters() / 1e9, 1) == 671.0  # MTP layer not counted


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_count_matches_built_model(name):
    config = preset(name)
    model = K2ForCausalLM(config)
    # the state dict holds every weight, e_score_correction_bias included
    assert config.num_parameters() == sum(t.numel() for t in model.state_dict().values())


def test_preset_sizes():
    assert 8e6 < preset("tiny").num_parameters() < 12e6
    assert 80e6 < preset("small").num_parameters() < 130e6


def test_k2_preset_builds_on_meta_without_allocating():
    start = time.perf_counter()
    with torch.device("meta"):
        model = K2ForCausalLM(preset("k2"))
    elapsed = time.perf_counter() - start
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert sum(t.numel() for t in model.state_dict().values()) == 1_026_408_232_448
    print(f"k2 preset on meta: {elapsed:.2f} s")


def test_unknown_scoring_func_is_one_clear_error(fixtures):
    raw = json.loads((fixtures / "configs" / "kimi_k2.json").read_text())
    raw["scoring_func"] = "sigmoid2"
    with pytest.raises(ValueError, match="unknown scoring_func 'sigmoid2'"):
        ModelConfig.from_hf(raw)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_group": 3}, "not divisible by n_group"),
        ({"topk_group": 2}, "exceeds n_group"),
        ({"qk_rope_head_dim": 15}, "must be even"),
        ({"topk_method": "top1"}, "unknown topk_method"),
    ],
)
def test_bad_config_values_name_themselves(change, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny").replace(**change)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
