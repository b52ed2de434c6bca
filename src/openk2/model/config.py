"""Model configuration: the hub `config.json` of Kimi-K2 / DeepSeek-V3 as one dataclass (paper §2.3).

Field names are the hub's keys, so `from_hf` / `to_hf` are plain copies: a config read from the hub
writes back unchanged (unknown keys ride along in `extra`, and keys the source lacked stay absent).
Defaults are Kimi-K2's values (spec §1).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


@dataclass
class ModelConfig:
    """Architecture of a DeepSeek-V3-style MLA + MoE decoder; defaults are Kimi-K2's (spec §1)."""

    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU layers (the first `first_k_dense_replace`)
    moe_intermediate_size: int = 2048  # per routed expert, and per shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_key_value_heads: int = 64  # unused by MLA; kept for the hub round trip
    # MLA (DeepSeek-V2 §2.1): q_lora_rank None means a plain q_proj (V2-Lite, Moonlight)
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE router
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"  # noaux_tc: select on score + e_score_correction_bias
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.827
    # Sequence-wise balance loss weight (DeepSeek-V3 eq. 17); 0 = off. Same key and meaning as
    # DeepSeek's own modeling code, so a hub config that sets it trains as its authors intended.
    aux_loss_alpha: float = 0.0
    seq_aux: bool = True
    # Positions
    max_position_embeddings: int = 131072
    rope_theta: float = 50000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn",
        }
    )
    # Misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0  # MTP layers: counted and loaded by nobody here
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585
    architectures: list[str] = field(default_factory=lambda: ["DeepseekV3ForCausalLM"])
    model_type: str = "kimi_k2"
    # Hub keys we do not model (auto_map, quantization_config, torch_dtype, ...), kept verbatim.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Keys the source config.json had; None for configs built in code (they write every field).
    _hf_keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Fail loudly, naming the bad value (house rule 10)."""
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"unknown scoring_func {self.scoring_func!r}; expected one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"unknown topk_method {self.topk_method!r}; expected one of {TOPK_METHODS}")
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; K2 uses 'silu' (SwiGLU)")
        if self.attention_bias:
            raise ValueError("attention_bias=True is not supported: the K2 architecture has no biases")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True is not supported: K2 unties embeddings and lm_head")
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.n_routed_experts and self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.n_routed_experts and not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts]")
        if self.n_routed_experts and self.num_experts_per_tok > self.topk_group * self.experts_per_group:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the {self.topk_group} groups × "
                f"{self.experts_per_group} experts the group-limited router can choose from"
            )
        if self.extra.get("rope_interleave") is False:
            raise ValueError("rope_interleave=False is not supported: K2 rotates interleaved pairs")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "default", None):
                raise ValueError(f"unsupported rope_scaling type {kind!r}; openk2 implements 'yarn'")

    # ----------------------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def yarn(self) -> dict[str, Any] | None:
        """The YaRN parameters, or None when positions are plain RoPE."""
        rs = self.rope_scaling
        if rs is None or rs.get("type", rs.get("rope_type")) != "yarn" or rs.get("factor", 1.0) <= 1.0:
            return None
        return rs

    @property
    def softmax_scale(self) -> float:
        """(d_nope + d_rope)^-0.5, times mscale(mscale_all_dim)^2 under YaRN, as DeepSeek-V3 and transformers do."""
        scale = self.qk_head_dim**-0.5
        yarn = self.yarn
        if yarn is not None and yarn.get("mscale_all_dim"):
            m = 0.1 * yarn["mscale_all_dim"] * math.log(yarn["factor"]) + 1.0
            scale *= m * m
        return scale

    # ----------------------------------------------------------------------------- size
    def num_parameters(self, active: bool = False) -> int:
        """Every weight the hub checkpoint holds (e_score_correction_bias included, MTP layers excluded).

        `active=True` counts what one token touches: embeddings, head, attention, dense MLPs, the
        shared experts, the router and `num_experts_per_tok` routed experts per MoE layer.
        """
        h = self.hidden_size
        n_heads = self.num_attention_heads
        if self.q_lora_rank is None:
            q = h * n_heads * self.qk_head_dim
        else:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * n_heads * self.qk_head_dim
        kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * n_heads * (self.qk_nope_head_dim + self.v_head_dim)
        attn = q + kv + n_heads * self.v_head_dim * h + 2 * h  # + o_proj + the two layer norms
        swiglu = 3 * h
        total = 2 * self.vocab_size * h + h  # embed_tokens, lm_head, final norm
        for i in range(self.num_hidden_layers):
            total += attn
            if not self.is_moe_layer(i):
                total += swiglu * self.intermediate_size
                continue
            experts = self.num_experts_per_tok if active else self.n_routed_experts
            total += swiglu * self.moe_intermediate_size * (experts + self.n_shared_experts)
            total += self.n_routed_experts * h  # router
            if self.topk_method == "noaux_tc":
                total += self.n_routed_experts  # e_score_correction_bias
        return total

    # ----------------------------------------------------------------------------- hub I/O
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """Read a hub `config.json` (a path to it, its folder, or the parsed dict)."""
        if isinstance(source, dict):
            raw = copy.deepcopy(source)
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            raw = json.loads(path.read_text())
        known = {f.name for f in fields(cls)} - {"extra", "_hf_keys"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known and k != "rope_parameters"}
        if "rope_parameters" in raw:  # transformers >= 5 writes rope_theta + rope_scaling as one dict
            rope = dict(raw["rope_parameters"] or {})
            if "rope_theta" in rope:
                kwargs.setdefault("rope_theta", rope.pop("rope_theta"))
            kwargs.setdefault("rope_scaling", rope or None)
        return cls(**kwargs, extra=extra, _hf_keys=tuple(raw))

    def to_hf(self, complete: bool = False) -> dict[str, Any]:
        """The hub `config.json` dict. Keys a source config lacked stay absent unless their value
        changed or `complete=True` (checkpoints write complete configs so that other loaders, whose
        defaults differ from K2's, build the same model)."""
        defaults = ModelConfig()
        rope_parameters = self._hf_keys is not None and "rope_parameters" in self._hf_keys
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("extra", "_hf_keys"):
                continue
            value = getattr(self, f.name)
            if rope_parameters and f.name in ("rope_theta", "rope_scaling") and f.name not in self._hf_keys:
                continue  # written back inside rope_parameters below
            if complete or self._hf_keys is None or f.name in self._hf_keys or value != getattr(defaults, f.name):
                out[f.name] = copy.deepcopy(value)
        if rope_parameters:
            out["rope_parameters"] = {**copy.deepcopy(self.rope_scaling or {"rope_type": "default"}),
                                      "rope_theta": self.rope_theta}
        out.update(copy.deepcopy(self.extra))
        if self._hf_keys is not None:  # keep the source's key order, new keys last
            order = {k: i for i, k in enumerate(self._hf_keys)}
            out = dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- presets
def _k2() -> ModelConfig:
    return ModelConfig()


def _tiny() -> ModelConfig:
    # ~10M parameters, K2's shape in miniature: 1 dense layer then MoE, q-LoRA, sparsity 8
    return ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.827,
        max_position_embeddings=2048, rope_scaling=None, bos_token_id=0, eos_token_id=1,
        model_type="deepseek_v3",  # transformers maps per-expert keys only for this type, not kimi_k2
    )


def _small() -> ModelConfig:
    # ~100M parameters: 8 layers of d=512, 32 experts of which 4 active
    return ModelConfig(
        vocab_size=32768, hidden_size=512, intermediate_size=1536, moe_intermediate_size=192,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=2.827,
        max_position_embeddings=4096, rope_scaling=None, bos_token_id=0, eos_token_id=1,
        model_type="deepseek_v3",
    )


PRESETS = {"k2": _k2, "tiny": _tiny, "small": _small}


def preset(name: str) -> ModelConfig:
    """A named model size: `k2` (full, build it on the meta device), `tiny` (~10M), `small` (~100M)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
