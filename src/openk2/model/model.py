"""The Kimi K2 model (paper §2.3): a DeepSeek-V3-style decoder with MLA attention and a sigmoid-routed MoE.

Read leaf to root: RMSNorm → RoPE/YaRN → MLA → SwiGLU MLP → router → experts → MoE → block → model.
Module attribute names are the hub's checkpoint keys; the one exception is the routed experts, held
stacked as (E, out, in) tensors for speed and split into `experts.{j}.*` by `hub.py` on save.
The model is single-device code; parallelism is applied from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openk2.model.config import ModelConfig
from openk2.model.experts import experts_swiglu
from openk2.model.loss import linear_cross_entropy


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # next-token cross-entropy (+ balance loss when on)
    aux_loss: torch.Tensor | None = None  # the sequence-wise balance loss alone, when on


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 whatever the activation dtype, as DeepSeek and transformers do
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


# ----------------------------------------------------------------------------- positions
def rope_inv_freq(config: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rope dims and the YaRN attention factor (YaRN paper eq. 23–25),
    computed exactly as transformers' `_compute_yarn_parameters` does for DeepSeek-V3."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float) / dim)
    yarn = config.yarn
    if yarn is None:
        return 1.0 / pos_freqs, 1.0
    factor = yarn["factor"]
    original = yarn["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = yarn.get("mscale"), yarn.get("mscale_all_dim")
    attention_factor = yarn.get("attention_factor")
    if attention_factor is None:
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(yarn.get("beta_fast") or 32)
    high = correction_dim(yarn.get("beta_slow") or 1)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original frequency, 0 interpolates it by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_cos_sin(config: ModelConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape (B or 1, T, 1, d_rope/2), already times the YaRN attention factor."""
    inv_freq, attention_factor = rope_inv_freq(config, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, d/2)
    cos = (freqs.cos() * attention_factor).to(dtype)[:, :, None, :]
    sin = (freqs.sin() * attention_factor).to(dtype)[:, :, None, :]
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), … of the last dim (DeepSeek's layout).

    The output lists the rotated even dims then the odd dims. Queries and keys get the same
    permutation, so their dot products, hence the attention, are those of the interleaved form.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ----------------------------------------------------------------------------- attention
class MultiHeadLatentAttention(nn.Module):
    """MLA (DeepSeek-V2 §2.1, K2 §2.3): low-rank q and kv, RoPE on a decoupled 64-dim part shared by heads.

    Training runs the expanded form. With `record_max_logits` on, the forward also keeps, per head,
    the largest scaled pre-softmax logit seen since the last `reset` (MuonClip's S_max, paper Alg. 1).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads = c.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = c.q_lora_rank, c.kv_lora_rank
        self.d_nope, self.d_rope, self.d_v = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.softmax_scale = c.softmax_scale
        q_out = self.n_heads * (self.d_nope + self.d_rope)
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)  # rows per head: [nope | rope]
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + self.d_rope, bias=False)  # [c_kv | k^R]
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (self.d_nope + self.d_v), bias=False)  # [k^C | v]
        self.o_proj = nn.Linear(self.n_heads * self.d_v, c.hidden_size, bias=False)
        self.record_max_logits = False
        self.max_logits: torch.Tensor | None = None  # (n_heads,) fp32, when recording

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attn_mask (B, 1, T, T) bool, True = may attend, replaces the causal mask (packed sequences)."""
        B, T, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.d_nope + self.d_rope)
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.d_rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, T, self.n_heads, self.d_nope + self.d_v)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.view(B, T, 1, self.d_rope), cos, sin)  # one k^R shared by all heads
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # (B, nh, T, d_qk)
        k = torch.cat((k_nope, k_rope.expand(-1, -1, self.n_heads, -1)), dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)  # (B, nh, T, d_v)
        if self.record_max_logits and torch.is_grad_enabled():  # S_max of training forwards only
            y = self._attend_recording(q, k, v, attn_mask)
        else:
            # fused (flash) kernels need one head dim for q, k and v: pad v with zeros, drop them after
            pad = q.shape[-1] - self.d_v
            y = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)) if pad > 0 else v, attn_mask=attn_mask,
                                               is_causal=attn_mask is None, scale=self.softmax_scale)
            y = y[..., : self.d_v] if pad > 0 else y
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_v))

    def _attend_recording(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Eager attention that keeps max over (batch, attended entries) of each head's scaled logits."""
        T = q.shape[2]
        logits = (q @ k.transpose(-2, -1)) * self.softmax_scale  # (B, nh, T, T)
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() if attn_mask is None else attn_mask
        logits = logits.masked_fill(~allowed, float("-inf"))
        with torch.no_grad():
            batch_max = logits.amax(dim=(-2, -1)).float().amax(dim=0)  # (nh,)
            self.max_logits = batch_max if self.max_logits is None else torch.maximum(self.max_logits, batch_max)
        probs = torch.softmax(logits.float(), dim=-1).to(q.dtype)
        return probs @ v

    def reset_max_logits(self) -> None:
        self.max_logits = None


# ----------------------------------------------------------------------------- feed-forward
class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid top-k router with aux-loss-free balancing (DeepSeek-V3 §2.1.2, spec §1).

    Experts are *selected* on score + e_score_correction_bias (group-limited when n_group > 1) and
    *mixed* with the unbiased scores, normalised, times routed_scaling_factor. The bias is a buffer:
    no gradient reaches it; `K2ForCausalLM.update_expert_bias` moves it from the recorded loads.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.top_k, self.n_experts = c.num_experts_per_tok, c.n_routed_experts
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.scoring_func, self.topk_method = c.scoring_func, c.topk_method
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        if c.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts))
        else:
            self.e_score_correction_bias = None
        # tokens routed to each expert since the last bias update (training forwards only)
        self.register_buffer("tokens_per_expert", torch.zeros(c.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H) -> top-k weights (N, k) in x's dtype, top-k expert ids (N, k), all scores (N, E) fp32."""
        logits = F.linear(x.float(), self.weight.float())  # routing in fp32 (spec §1)
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_method != "greedy":
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # (N, G, E/G)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
            else:  # DeepSeek-V2's group_limited_greedy
                group_scores = grouped.amax(dim=-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        topk_idx = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        if self.training:
            with torch.no_grad():
                # index_add_, not bincount: a static shape, so no graph break when compiled
                flat = topk_idx.flatten()
                self.tokens_per_expert.index_add_(0, flat, torch.ones_like(flat, dtype=self.tokens_per_expert.dtype))
        return weights.to(x.dtype), topk_idx, scores


class Experts(nn.Module):
    """The routed SwiGLU experts, stacked: gate/up (E, I, H), down (E, H, I).

    Tokens are sorted by expert and each expert multiplies only its own contiguous rows: no loop over tokens,
    no expert applied to tokens it was not routed (DeepSeek-V3's dropless MoE). The arithmetic is one op,
    `experts_swiglu` (model/experts.py), so that torch.compile can take the layer around it.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, H))
        self.up_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """x (N, H), weights/topk_idx (N, k) -> (N, H)."""
        N, k = topk_idx.shape
        flat = topk_idx.flatten()  # (N*k,) one slot per (token, choice)
        order = flat.argsort(stable=True)
        # a count per expert with a static shape (bincount's depends on the data): no graph break when compiled
        counts = torch.zeros(self.gate_proj.shape[0], dtype=torch.int32, device=x.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        if torch.is_autocast_enabled(x.device.type):  # a custom op is not autocast: cast as autocast would
            dtype = torch.get_autocast_dtype(x.device.type)
            x, gate, up, down = x.to(dtype), gate.to(dtype), up.to(dtype), down.to(dtype)
        ys, _, _ = experts_swiglu(x[order // k], gate, up, down, counts.cumsum(0, dtype=torch.int32))
        y = torch.empty_like(ys).index_copy_(0, order, ys).view(N, k, -1)  # back to (token, choice) order
        return torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1)  # weighted sum over the k choices


class MoE(nn.Module):
    """Routed experts + shared experts (spec §1). Returns the output and the sequence-wise balance loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts else None
        )
        self.aux_loss_alpha = config.aux_loss_alpha if config.seq_aux else 0.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, H = x.shape
        flat = x.view(B * T, H)
        weights, topk_idx, scores = self.gate(flat)
        y = self.experts(flat, weights, topk_idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        aux = None
        if self.training and self.aux_loss_alpha > 0:
            aux = self.sequence_balance_loss(scores.view(B, T, -1), topk_idx.view(B, T * self.gate.top_k))
        return y.view(B, T, H), aux

    def sequence_balance_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 eq. 17–20: α Σ_i f_i P_i per sequence, averaged over the batch."""
        B, T, E = scores.shape
        k = self.gate.top_k
        f = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, topk_idx, torch.ones_like(topk_idx, dtype=torch.float)
        ) * (E / (k * T))
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
        return self.aux_loss_alpha * (f * p).sum(dim=1).mean()


# ----------------------------------------------------------------------------- model
class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, attn_mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask=attn_mask)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, aux = self.mlp(h)
            return x + out, aux
        return x + self.mlp(h), None


class K2Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None):
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)  # (B, T, H)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)
        attn_mask = None
        if document_ids is not None:  # packed rows: causal within each document, nothing across documents
            if document_ids.shape != input_ids.shape:
                raise ValueError(f"document_ids shape {tuple(document_ids.shape)} differs from input_ids "
                                 f"{tuple(input_ids.shape)}")
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            attn_mask = ((document_ids[:, :, None] == document_ids[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
        aux_losses = []
        for layer in self.layers:
            x, aux = layer(x, cos, sin, attn_mask)
            if aux is not None:
                aux_losses.append(aux)
        return self.norm(x), (torch.stack(aux_losses).sum() if aux_losses else None)


class K2ForCausalLM(nn.Module):
    """Kimi K2 for next-token prediction; `openk2.K2ForCausalLM(config)` (paper §2.3).

    `model(input_ids)` gives `.logits` (B, T, V); with `labels` also `.loss` (labels are shifted
    inside, -100 is ignored, as in transformers).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = K2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zero router bias (as transformers)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if p.ndim >= 2:
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
        for buf in self.buffers():
            if not buf.is_meta:
                buf.zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """document_ids (B, T): packed sequences; a token attends only to earlier tokens of its own document."""
        self._check_ids(input_ids)
        hidden, aux = self.model(input_ids, position_ids, document_ids)
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(hidden))
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}")
        logits, loss = linear_cross_entropy(hidden, self.lm_head.weight, labels)
        if aux is not None:
            loss = loss + aux
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux)

    @torch.compiler.disable  # it reads two ints on the host: a clean graph break, not a skipped forward
    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.numel() and not input_ids.is_meta:
            lo, hi = (int(v) for v in torch.aminmax(input_ids))  # one pass, one sync
            if lo < 0 or hi >= self.config.vocab_size:
                bad = hi if hi >= self.config.vocab_size else lo
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    # ------------------------------------------------------------------------- MoE balance
    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoE)]

    @torch.no_grad()
    def update_expert_bias(self, gamma: float = 1e-3) -> dict[str, float | list[float]]:
        """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): bias_i += γ·sign(mean_load − load_i).

        Uses the loads recorded by training forwards since the last call (summed over data-parallel
        ranks when torch.distributed is initialised), then clears them. Returns per-layer max/mean
        load ("maxvio"-style imbalance: 1.0 is perfect balance).
        """
        stats: dict[str, float | list[float]] = {"load_max_over_mean": []}
        loads = [moe.gate.tokens_per_expert for _, moe in self.moe_layers()]
        if not loads:
            return stats
        stacked = torch.stack(loads)  # (L_moe, E)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stacked)
        for (_, moe), load in zip(self.moe_layers(), stacked):
            mean = load.mean()
            if moe.gate.e_score_correction_bias is not None and mean > 0:
                moe.gate.e_score_correction_bias += gamma * torch.sign(mean - load)
            stats["load_max_over_mean"].append(float(load.max() / mean) if mean > 0 else float("nan"))
            moe.gate.tokens_per_expert.zero_()
        ratios = [r for r in stats["load_max_over_mean"] if not math.isnan(r)]
        stats["load_max_over_mean_avg"] = sum(ratios) / len(ratios) if ratios else float("nan")
        return stats

    # ------------------------------------------------------------------------- hub layout
    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        """Write config.json + safetensors in the hub layout (see `openk2.model.hub`)."""
        from openk2.model import hub

        hub.save_pretrained(self, path, **({} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}))

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        """Load a hub-layout folder (ours, transformers', or the hub's)."""
        from openk2.model import hub

        return hub.load_pretrained(path, dtype=dtype, device=device)

    def num_parameters(self, active: bool = False) -> int:
        return self.config.num_parameters(active=active)
