import pytest

from openk2.config import ConfigError, load_config, to_toml
from openk2.train.config import PretrainConfig


def test_toml_and_overrides_resolve_with_types(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('run_dir = "runs/x"\n[train]\nsteps = 10\n[optim]\nname = "adamw"\nlr = 1\n')
    overrides = ["train.batch_size=4", "optim.qk_clip_tau=50", "model.overrides={num_hidden_layers = 2}"]
    cfg = load_config(PretrainConfig, path, overrides)
    assert cfg.train.steps == 10 and cfg.train.batch_size == 4
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.qk_clip_tau == 50.0 and cfg.model.overrides == {"num_hidden_layers": 2}


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(PretrainConfig, None, ["optim.qk_clip_tau=30", "data.tokenizer=\"tok.json\""])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(PretrainConfig, path) == cfg
    none_tau = load_config(PretrainConfig, None, [])
    none_tau.data.tokenizer = None
    path.write_text(to_toml(none_tau))
    assert load_config(PretrainConfig, path).data.tokenizer is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key train.stepz"),
        ("optim.name=sgd", r"optim.name must be one of \['muonclip', 'adamw'\]"),
        ("train.steps=ten", "train.steps must be int"),
        ("train.steps=true", "train.steps must be int"),
        ("train.batch_size=6", "not divisible by train.grad_accum"),
        ("optim.qk_clip_tau=0", "qk_clip_tau must be positive"),
        ("nonsense", "is not key=value"),
    ],
)
def test_bad_config_is_one_clear_error(override, message):
    extra = ["train.grad_accum=4"] if "batch_size" in override else []
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, None, [override, *extra])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        load_config(PretrainConfig, tmp_path / "nope.toml")
