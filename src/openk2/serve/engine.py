"""Generation engine for K2 models: expanded-MLA prefill, absorbed-MLA decode over a latent cache (spec §1).

The cache keeps, per layer, sequence slot and position, only [c_kv | k^R]: the RMSNorm'd kv latent
(kv_lora_rank) and the rotated shared rope key (qk_rope_head_dim), i.e. (512 + 64) × 2 = 1,152 bytes
per token and layer in bf16 at K2's sizes. Decode never expands it to per-head keys and values
(DeepSeek-V3's "absorb" inference), and its weights are folded once, when the engine is built:
W_UK (the key half of kv_b_proj) and the softmax scale go into the query projection, which then
gives each head a query [q^C·W_UK | q^R] in the cache's own width; W_UV (the value half) goes into
o_proj. Attention is then one SDPA call with the latents as both keys and values (the k^R columns of
the output meet zero columns of the folded o_proj). Gate and up are stacked, the shared experts join
the routed ones as experts every token picks, and the chosen experts run in place (grouped_mm), so a
MoE layer is a dozen ops for any batch. `compile=True` runs the whole step through torch.compile.
On a CPU in fp32, the largest matrices (the LM head first) are also prepacked for oneDNN, which streams them
from DRAM several times faster than the plain matmul (`openk2.serve.packed_linear`).
At K2's sizes the folded q and o projections hold ~3x the parameters of the unfolded ones, and the
stacked experts are a copy: this engine trades memory for fewer, larger matmuls.

The model's own forward stays the training path; prefill runs its modules in the expanded form.
Read top to bottom: cache → folded decode weights → decode step → prefill → Engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from openk2.model.config import ModelConfig
from openk2.model.model import K2ForCausalLM, MoE, MultiHeadLatentAttention, Router, apply_rope, rope_cos_sin
from openk2.serve.packed_linear import PackedLinear, pack_linears
from openk2.serve.sampling import SamplingParams, sample

# config fields that do not change what the network computes: a checkpoint may differ in them and still load
NOT_ARCHITECTURE = ("bos_token_id", "eos_token_id", "initializer_range", "architectures", "model_type",
                    "max_position_embeddings", "aux_loss_alpha", "seq_aux", "num_nextn_predict_layers")


# ----------------------------------------------------------------------------- cache
class LatentCache:
    """Preallocated [c_kv | k^R] for every layer, sequence slot and position: (L, slots, T, r + d_rope).

    `lengths[slot]` (tokens cached per slot) is host-side bookkeeping, so steps never wait on the device.
    """

    def __init__(self, config: ModelConfig, max_batch: int, max_seq_len: int,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        if max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch and max_seq_len must be >= 1, got {max_batch} and {max_seq_len}")
        self.kv_lora_rank, self.rope_dim = config.kv_lora_rank, config.qk_rope_head_dim
        width = config.kv_lora_rank + config.qk_rope_head_dim
        # zeros, not empty: masked positions still meet the attention's values, and 0 * nan is nan
        self.kv = torch.zeros(config.num_hidden_layers, max_batch, max_seq_len, width, dtype=dtype, device=device)
        self.lengths = [0] * max_batch

    @property
    def max_batch(self) -> int:
        return self.kv.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.kv.shape[2]

    @property
    def bytes_per_token_per_layer(self) -> int:
        return self.kv.shape[-1] * self.kv.element_size()


# ----------------------------------------------------------------------------- folded decode weights
@dataclass
class AttentionWeights:
    """One layer's absorbed MLA. W = kv_lora_rank + d_rope is the cache width; queries are (nh, W) per token."""

    norm: torch.Tensor  # input_layernorm (H,)
    w_a: torch.Tensor  # rows [q_a_proj | kv_a_proj_with_mqa] (r_q + W, H), or [folded q_proj | kv_a] (nh·W + W, H)
    q_norm: torch.Tensor | None  # q_a_layernorm (r_q,); None without q-LoRA
    w_q: torch.Tensor | None  # q_b_proj with W_UK and the softmax scale folded in (nh·W, r_q); None without q-LoRA
    kv_norm: torch.Tensor  # kv_a_layernorm (r,)
    w_o: torch.Tensor  # o_proj·W_UV, zero columns at each head's k^R dims (H, nh·W)
    eps: float
    q_eps: float
    kv_eps: float
    packed: dict[str, PackedLinear] = field(default_factory=dict)  # oneDNN copies of w_a / w_q / w_o, by name


@dataclass
class FeedForwardWeights:
    """A SwiGLU layer as stacked experts, laid out for `x @ w`: [gate | up] (X, H, 2I), down (X, I, H).

    A dense layer is one "expert"; a MoE layer stacks the routed experts, then the shared experts
    split into pieces of moe_intermediate_size (a SwiGLU is a sum over its intermediate units).
    """

    norm: torch.Tensor  # post_attention_layernorm (H,)
    w_gu: torch.Tensor
    w_d: torch.Tensor
    eps: float
    router: Router | None  # the model's own (fp32 routing, exact); None for a dense layer
    n_shared: int = 0  # shared-expert pieces, the last rows of w_gu / w_d
    expert_ids: torch.Tensor | None = None  # arange(X), made once
    packed: dict[str, PackedLinear] = field(default_factory=dict)  # a dense layer's w_gu / w_d for oneDNN, by name


@dataclass
class DecodeWeights:
    embed: torch.Tensor  # (V, H)
    layers: list[tuple[AttentionWeights, FeedForwardWeights]]
    norm: torch.Tensor  # (H,)
    norm_eps: float
    lm_head: torch.Tensor  # (V, H)
    rope: torch.Tensor  # (max_seq_len, d_rope) fp32: [cos | sin] × YaRN attention factor per position
    rope_basis: torch.Tensor  # (d_rope, d_rope²) fp32: [cos | sin] -> the rotation matrix apply_rope applies
    position_ids: torch.Tensor  # arange(max_seq_len), for the masks
    n_heads: int
    kv_lora_rank: int
    packed_lm_head: PackedLinear | None = None


def _fold_attention(layer, config: ModelConfig) -> AttentionWeights:
    attn: MultiHeadLatentAttention = layer.self_attn
    nh, dn, dr, r = attn.n_heads, attn.d_nope, attn.d_rope, attn.kv_lora_rank
    f64 = torch.float64  # fold in double, round once to the model's dtype
    kv_b = attn.kv_b_proj.weight.to(f64).view(nh, dn + attn.d_v, r)
    w_uk, w_uv = kv_b[:, :dn], kv_b[:, dn:]  # (nh, d_nope, r), (nh, d_v, r)
    q_proj = attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj
    w = q_proj.weight.to(f64).view(nh, dn + dr, -1)  # rows per head [nope | rope]
    w_q = torch.cat((torch.einsum("hdc,hdq->hcq", w_uk, w[:, :dn]), w[:, dn:]), dim=1)  # (nh, W, in)
    w_q = (w_q * attn.softmax_scale).reshape(nh * (r + dr), -1)
    o = attn.o_proj.weight.to(f64).view(-1, nh, attn.d_v)
    w_o = F.pad(torch.einsum("ohd,hdc->ohc", o, w_uv), (0, dr)).reshape(o.shape[0], nh * (r + dr))
    dtype = attn.o_proj.weight.dtype
    kv_a = attn.kv_a_proj_with_mqa.weight
    if attn.q_lora_rank is None:
        w_a, q_norm, w_q, q_eps = torch.cat((w_q.to(dtype), kv_a)), None, None, 0.0
    else:
        w_a, q_norm, w_q = torch.cat((attn.q_a_proj.weight, kv_a)), attn.q_a_layernorm.weight, w_q.to(dtype)
        q_eps = attn.q_a_layernorm.eps
    return AttentionWeights(norm=layer.input_layernorm.weight, w_a=w_a, q_norm=q_norm, w_q=w_q,
                            kv_norm=attn.kv_a_layernorm.weight, w_o=w_o.to(dtype), eps=layer.input_layernorm.eps,
                            q_eps=q_eps, kv_eps=attn.kv_a_layernorm.eps)


def _fold_feed_forward(layer) -> FeedForwardWeights:
    mlp, norm = layer.mlp, layer.post_attention_layernorm
    if not isinstance(mlp, MoE):
        w_gu = torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)).T[None].contiguous()  # (1, H, 2I)
        return FeedForwardWeights(norm.weight, w_gu, mlp.down_proj.weight.T[None].contiguous(), norm.eps, None)
    ex = mlp.experts
    w_gu, w_d = torch.cat((ex.gate_proj, ex.up_proj), dim=1), ex.down_proj.transpose(1, 2)  # (E, 2I, H), (E, I, H)
    n_shared = 0
    if mlp.shared_experts is not None:
        s, I = mlp.shared_experts, ex.gate_proj.shape[1]
        n_shared = s.gate_proj.weight.shape[0] // I
        gate, up = s.gate_proj.weight.view(n_shared, I, -1), s.up_proj.weight.view(n_shared, I, -1)
        w_gu = torch.cat((w_gu, torch.cat((gate, up), dim=1)))
        w_d = torch.cat((w_d, s.down_proj.weight.T.reshape(n_shared, I, -1)))
    return FeedForwardWeights(norm.weight, w_gu.transpose(1, 2).contiguous(), w_d.contiguous(), norm.eps, mlp.gate,
                              n_shared, torch.arange(w_d.shape[0], device=w_d.device))


def rope_table(config: ModelConfig, max_seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[cos | sin] per position, exactly as `rope_cos_sin` computes them, and the basis that makes them a
    rotation matrix R with x @ R = apply_rope(x) (DeepSeek's interleaved pairs, output evens then odds)."""
    cos, sin = rope_cos_sin(config, torch.arange(max_seq_len, device=device)[None], torch.float32)
    d, h = config.qk_rope_head_dim, config.qk_rope_head_dim // 2
    basis = torch.zeros(d, d, d, device=device)  # basis[j] is R's pattern for the j-th of [cos | sin]
    i = torch.arange(h, device=device)
    basis[i, 2 * i, i] = 1  # out[i] = x[2i] cos_i - x[2i+1] sin_i
    basis[i, 2 * i + 1, h + i] = 1  # out[h+i] = x[2i+1] cos_i + x[2i] sin_i
    basis[h + i, 2 * i + 1, i] = -1
    basis[h + i, 2 * i, h + i] = 1
    return torch.cat((cos[0, :, 0], sin[0, :, 0]), dim=-1), basis.view(d, d * d)


PACK_MIN_BYTES = 1 << 20  # below this, oneDNN's fixed cost per call (~12 µs here) outweighs its faster streaming


def pack_weights(w: DecodeWeights) -> None:
    """Prepack every decode matrix of at least PACK_MIN_BYTES for oneDNN (CPU, fp32), in place; experts never (they
    are read a few rows at a time). Nothing happens where `pack_linears` declines (no oneDNN, too little memory)."""
    wanted: list[tuple[dict | None, str, torch.Tensor]] = [(None, "lm_head", w.lm_head)]  # (owner, name, (out, in))
    for attn, ff in w.layers:
        wanted += [(attn.packed, name, getattr(attn, name)) for name in ("w_a", "w_q", "w_o")
                   if getattr(attn, name) is not None]
        if ff.router is None:
            wanted += [(ff.packed, "w_gu", ff.w_gu[0].T), (ff.packed, "w_d", ff.w_d[0].T)]
    wanted = [(owner, name, t) for owner, name, t in wanted if t.numel() * t.element_size() >= PACK_MIN_BYTES]
    packed = pack_linears([(t, None) for _, _, t in wanted])
    for (owner, name, _), linear in zip(wanted, packed or []):
        if owner is None:
            w.packed_lm_head = linear
        else:
            owner[name] = linear


@torch.no_grad()
def fold_weights(model: K2ForCausalLM, max_seq_len: int, pack: bool = False) -> DecodeWeights:
    """The decode step's weights: views of the model's where they can be, folded copies where they are not, and
    with `pack` oneDNN copies of the largest (`pack_weights`)."""
    m, c = model.model, model.config
    rope, basis = rope_table(c, max_seq_len, model.lm_head.weight.device)
    w = DecodeWeights(embed=m.embed_tokens.weight, norm=m.norm.weight, norm_eps=m.norm.eps,
                      layers=[(_fold_attention(layer, c), _fold_feed_forward(layer)) for layer in m.layers],
                      lm_head=model.lm_head.weight, rope=rope, rope_basis=basis,
                      position_ids=torch.arange(max_seq_len, device=rope.device),
                      n_heads=c.num_attention_heads, kv_lora_rank=c.kv_lora_rank)
    if pack:
        pack_weights(w)
    return w


# ----------------------------------------------------------------------------- decode step
def _linear(x: torch.Tensor, weight: torch.Tensor, packed: PackedLinear | None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """[residual +] x Wᵀ for W (out, in), through W's oneDNN copy when it has one."""
    if packed is not None:
        return packed(x) if residual is None else packed.add_to(residual, x)
    return F.linear(x, weight) if residual is None else torch.addmm(residual, x, weight.T)


def _attention(a: AttentionWeights, x, kv, layer: int, slots, positions, rows, T: int, R, mask, nh: int, r: int):
    """Absorbed MLA for one token per sequence: x (B, H) -> x + attention (B, H); writes kv[layer] (S, T_max, W)."""
    B, H = x.shape
    W = kv.shape[-1]
    h = _linear(F.rms_norm(x, (H,), a.norm, a.eps), a.w_a, a.packed.get("w_a"))
    if a.w_q is None:
        q, latent = h.split([nh * W, W], dim=-1)
    else:
        q_a, latent = h.split([h.shape[-1] - W, W], dim=-1)
        q = _linear(F.rms_norm(q_a, (q_a.shape[-1],), a.q_norm, a.q_eps), a.w_q, a.packed.get("w_q"))  # (B, nh·W)
    c_kv, k_rope = latent.split([r, W - r], dim=-1)
    entry = torch.cat((F.rms_norm(c_kv, (r,), a.kv_norm, a.kv_eps), torch.bmm(k_rope[:, None], R)[:, 0]), dim=-1)
    # (B, W) at each sequence's next position; indexing kv itself, not the view kv[layer], lets torch.compile
    # write in place (a view of an input is written as a copy of the whole view)
    kv.index_put_((slots.new_full((B,), layer), slots, positions), entry)
    q = q.view(B, nh, W)
    q = torch.cat((q[..., :r], torch.bmm(q[..., r:], R)), dim=-1)  # (B, nh, W): [q^C·W_UK | rotated q^R], scaled
    past = kv[layer, rows, :T][:, None]  # (B, 1, T, W): the heads share it, as one kv head of MQA
    y = F.scaled_dot_product_attention(q[:, None], past, past, attn_mask=mask, scale=1.0)  # (B, 1, nh, W)
    return _linear(y.reshape(B, nh * W), a.w_o, a.packed.get("w_o"), residual=x)


def expert_swiglu(rows: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor, ends: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """Each expert's SwiGLU on its own rows, times each row's scale: rows (N, H) grouped by expert, ends (X,) -> (N, H).

    Every expert reads its matrices in place. grouped_mm does it in one call (bf16 only on GPUs), but on
    the CPU it also calls a matmul for each expert without rows; for a few tokens a loop over the experts
    in use is cheaper there (reading `ends` on the CPU is no device sync).
    """
    if rows.is_cuda and rows.dtype != torch.bfloat16:  # no host sync: a CUDA graph can hold the step
        return gathered_swiglu(rows, w_gu, w_d, ends, scale)
    few_on_cpu = rows.device.type == "cpu" and 2 * rows.shape[0] < w_gu.shape[0]
    if few_on_cpu or (rows.device.type != "cpu" and rows.dtype != torch.bfloat16):  # the latter syncs, to loop
        out, start = rows.new_empty(rows.shape[0], w_d.shape[-1]), 0
        for e, end in enumerate(ends.tolist()):
            if end > start:
                g, u = torch.mm(rows[start:end], w_gu[e]).chunk(2, dim=-1)
                torch.mm(F.silu(g) * u * scale[start:end, None], w_d[e], out=out[start:end])
            start = end
        return out
    g, u = F.grouped_mm(rows, w_gu, offs=ends).chunk(2, dim=-1)
    return F.grouped_mm(F.silu(g) * u * scale[:, None], w_d, offs=ends)


def gathered_swiglu(rows: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor, ends: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """`expert_swiglu` with each row reading its own expert's matrices (a gather, then batched matmuls).

    No host sync, so a CUDA graph can hold it: the GPU path for dtypes grouped_mm does not take (fp32), where the
    loop would read `ends` on the host. It copies one set of expert matrices per row: fine for the few rows of a
    decode step; serve large models in bf16, where grouped_mm runs.
    """
    expert = torch.searchsorted(ends, torch.arange(rows.shape[0], device=rows.device, dtype=ends.dtype), right=True)
    g, u = torch.bmm(rows[:, None], w_gu[expert]).chunk(2, dim=-1)  # (N, 1, I) each
    return torch.bmm(F.silu(g) * u * scale[:, None, None], w_d[expert])[:, 0]


# the same as an op of its own, so that torch.compile calls it as it is instead of tracing its loop
compiled_expert_swiglu = torch.library.custom_op("openk2::expert_swiglu", expert_swiglu, mutates_args=())


@compiled_expert_swiglu.register_fake
def _(rows, w_gu, w_d, ends, scale):
    return rows.new_empty(rows.shape[0], w_d.shape[-1])


def _feed_forward(f: FeedForwardWeights, x: torch.Tensor) -> torch.Tensor:
    """x (B, H) -> x + SwiGLU or MoE (B, H) for a handful of tokens: no python loop over tokens, no copy of the
    experts' weights, and (on a GPU in bf16) no host sync."""
    B, H = x.shape
    h = F.rms_norm(x, (H,), f.norm, f.eps)
    if f.router is None:  # dense layer
        g, u = _linear(h, f.w_gu[0].T, f.packed.get("w_gu")).chunk(2, dim=-1)
        return _linear(F.silu(g) * u, f.w_d[0].T, f.packed.get("w_d"), residual=x)
    weights, idx, _ = f.router(h)  # (B, k): exactly the model's routing
    X = f.w_d.shape[0]
    if f.n_shared:  # the shared pieces are experts every token picks with weight 1
        idx = torch.cat((idx, f.expert_ids[X - f.n_shared:].expand(B, -1)), dim=1)
        weights = torch.cat((weights, weights.new_ones(B, f.n_shared)), dim=1)
    experts, order = idx.flatten().sort()  # (B·k',) the (token, choice) pairs grouped by expert
    ends = torch.searchsorted(experts, f.expert_ids, right=True, out_int32=True)  # (X,) where each group ends
    token = order // idx.shape[1]
    experts_fn = compiled_expert_swiglu if torch.compiler.is_compiling() else expert_swiglu
    return x.index_add(0, token, experts_fn(h[token], f.w_gu, f.w_d, ends, weights.flatten()[order]))


def decode_step(w: DecodeWeights, kv: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor,
                positions: torch.Tensor, first: int | None, T: int) -> torch.Tensor:
    """One new token per sequence -> next-token logits (B, V) fp32. ids, slots, positions (B,); kv (L, S, T_max, W).

    Sequence b writes its cache entry at positions[b] and attends to 0..positions[b]. `first` is set
    when the slots are first, first+1, ...: the step then reads the cache as a view, not a gather.
    """
    B = ids.shape[0]
    d = w.rope_basis.shape[0]
    x = F.embedding(ids, w.embed)  # (B, H)
    R = (w.rope[positions] @ w.rope_basis).view(B, d, d).to(x.dtype)  # per-sequence rotation, all layers
    mask = (w.position_ids[:T] <= positions[:, None])[:, None, None]  # (B, 1, 1, T)
    rows = slots if first is None else slice(first, first + B)
    for i, (attn, ff) in enumerate(w.layers):
        x = _attention(attn, x, kv, i, slots, positions, rows, T, R, mask, w.n_heads, w.kv_lora_rank)
        x = _feed_forward(ff, x)
    return _linear(F.rms_norm(x, (x.shape[-1],), w.norm, w.norm_eps), w.lm_head, w.packed_lm_head).float()


# ----------------------------------------------------------------------------- prefill (expanded MLA)
def _query(attn: MultiHeadLatentAttention, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, H) -> q^C (B, T, nh, d_nope), rotated q^R (B, T, nh, d_rope)."""
    B, T, _ = x.shape
    q = attn.q_proj(x) if attn.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q_nope, q_rope = q.view(B, T, attn.n_heads, attn.d_nope + attn.d_rope).split([attn.d_nope, attn.d_rope], -1)
    return q_nope, apply_rope(q_rope, cos, sin)


def mla_prefill(attn: MultiHeadLatentAttention, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """Expanded MLA over whole prompts (causal): x (B, T, H) -> output (B, T, H), cache entries (B, T, r + d_rope)."""
    B, T, _ = x.shape
    nh, r = attn.n_heads, attn.kv_lora_rank
    q_nope, q_rope = _query(attn, x, cos, sin)
    c_kv, k_rope = attn.kv_a_proj_with_mqa(x).split([r, attn.d_rope], dim=-1)
    k_rope = apply_rope(k_rope.view(B, T, 1, attn.d_rope), cos, sin).view(B, T, attn.d_rope)
    latent = torch.cat((attn.kv_a_layernorm(c_kv), k_rope), dim=-1)  # [RMSNorm(c_kv) | rotated k^R]
    c_kv = latent[..., :r]
    k_nope, v = attn.kv_b_proj(c_kv).view(B, T, nh, attn.d_nope + attn.d_v).split([attn.d_nope, attn.d_v], -1)
    q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # (B, nh, T, d_qk)
    k = torch.cat((k_nope, k_rope[:, :, None].expand(-1, -1, nh, -1)), dim=-1).transpose(1, 2)
    pad = max(q.shape[-1] - attn.d_v, 0)  # fused kernels want one head dim for q, k and v: zero-pad v, drop it after
    y = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)).transpose(1, 2), is_causal=True,
                                       scale=attn.softmax_scale)[..., : attn.d_v]  # (B, nh, T, d_v)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, nh * attn.d_v)), latent


# ----------------------------------------------------------------------------- decode as CUDA graphs
def padded_decode_inputs(tokens: Sequence[int], slots: Sequence[int], positions: Sequence[int],
                         size: int) -> list[list[int]]:
    """[tokens, slots, positions] padded to `size` rows by repeating the first row.

    A repeated row writes the very cache entry the first row writes (same token, slot and position), so the padding
    changes nothing that is read; its logits are dropped.
    """
    pad = size - len(tokens)
    return [list(tokens) + [tokens[0]] * pad, list(slots) + [slots[0]] * pad, list(positions) + [positions[0]] * pad]


class DecodeGraphs:
    """The decode step captured once per batch size bucket as a CUDA graph, then replayed (vLLM's decode graphs).

    A graph replays fixed kernels on fixed memory: inputs go through one static (3, size) buffer, batches are padded
    up to the next bucket (1, 2, 4, ... max_batch), and every step attends over the whole cache length under its
    mask, so the shapes never change. What this removes is the per-step launch of every kernel from Python, which
    is all of a small model's decode time on a GPU. Captured on first use of a bucket; `clear()` after the weights
    are re-folded, since a graph holds the addresses of the tensors it was captured with.
    """

    def __init__(self, step: Callable[..., torch.Tensor], max_batch: int, max_seq_len: int, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {device}")
        self.step, self.max_seq_len, self.device = step, max_seq_len, device
        self.sizes = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for all buckets: they never run at once

    def clear(self) -> None:
        self.graphs.clear()

    def __call__(self, weights: DecodeWeights, kv: torch.Tensor, tokens: list[int], slots: list[int],
                 positions: list[int]) -> torch.Tensor:
        size = next(n for n in self.sizes if n >= len(tokens))
        rows = torch.tensor(padded_decode_inputs(tokens, slots, positions, size))
        if size not in self.graphs:
            self.graphs[size] = self._capture(weights, kv, rows)
        graph, inputs, logits = self.graphs[size]
        inputs.copy_(rows)
        graph.replay()
        return logits[: len(tokens)].clone()  # the buffer is overwritten by the next replay

    def _capture(self, weights: DecodeWeights, kv: torch.Tensor, rows: torch.Tensor):
        inputs = rows.to(self.device)
        ids, slots, positions = inputs

        def run() -> torch.Tensor:
            return self.step(weights, kv, ids, slots, positions, None, self.max_seq_len)

        # warm up on a side stream, as torch.cuda.graphs asks: lazy initialisation (cuBLAS handles, compiled
        # kernels) stays out of the capture. It writes the cache entries that the replay writes: the same values.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = run()
        return graph, inputs, logits


# ----------------------------------------------------------------------------- engine
@dataclass
class Completion:
    """One sequence's result. The stop token, when one ended it, is the last of `token_ids`."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each sampled token; see openk2.serve.sampling
    finish_reason: str | None = None  # "stop" (stop token or string) or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    text: str | None = None  # decoded without the stop token / string, when `generate` got `decode`


class Engine:
    """Batched generation with a K2 model: `Engine(model, max_batch=8, max_seq_len=2048).generate(prompts)`.

    Puts the model in eval mode (no router load bookkeeping). Sequence slots are rows of the cache;
    `prefill`, `decode` and `release` are the step-level API a scheduler (continuous batching) drives.
    `compile=True` runs the decode step through torch.compile (dynamic shapes: one compile for batch 1,
    one for larger batches, whatever the cache length). `cuda_graphs=True` (model on a CUDA device) replays the
    decode step as CUDA graphs (`DecodeGraphs`). Weights are folded for decode when the engine
    is built; after changing the model's weights call `refresh_weights()`, or use `load_weights`. `pack=None`
    prepacks the largest decode matrices for oneDNN where that runs (eager fp32 on a CPU: `pack_weights`).
    """

    def __init__(self, model: K2ForCausalLM, max_batch: int = 8, max_seq_len: int = 2048, compile: bool = False,
                 cuda_graphs: bool = False, pack: bool | None = None):
        self.model = model.eval()
        self.config = model.config
        p = model.lm_head.weight
        self.cache = LatentCache(self.config, max_batch, max_seq_len, dtype=p.dtype, device=p.device)
        self.max_batch, self.max_seq_len, self.vocab_size = max_batch, max_seq_len, self.config.vocab_size
        self.device = p.device
        # the compiled step packs on its own terms (inductor), and a CUDA graph has nothing to pack
        self.pack = (not compile and not cuda_graphs and p.device.type == "cpu") if pack is None else pack
        self.weights = fold_weights(model, max_seq_len, self.pack)
        self._step = torch.compile(decode_step, options={"cpp_wrapper": True}) if compile else decode_step
        self._graphs = DecodeGraphs(self._step, max_batch, max_seq_len, self.device) if cuda_graphs else None

    # ------------------------------------------------------------------------- weights
    def refresh_weights(self) -> None:
        """Re-fold the decode weights from the model's current parameters."""
        self.weights = fold_weights(self.model, self.max_seq_len, self.pack)
        if self._graphs is not None:
            self._graphs.clear()

    @torch.no_grad()
    def load_weights(self, path) -> None:
        """Replace the model's weights in place from a hub-layout checkpoint folder of the same architecture.

        The cache is kept: sequences in flight continue on the new weights (RL's checkpoint engine).
        """
        from openk2.model import hub

        new = hub.load_pretrained(path, dtype=self.cache.kv.dtype, device=self.device)
        differ = [f.name for f in dataclasses.fields(ModelConfig) if f.compare and f.name not in NOT_ARCHITECTURE
                  and getattr(new.config, f.name) != getattr(self.config, f.name)]
        if differ:
            raise ValueError(f"checkpoint {path} has another architecture: "
                             + ", ".join(f"{k}={getattr(new.config, k)!r} (engine: {getattr(self.config, k)!r})"
                                         for k in differ))
        ours = self.model.state_dict()
        for name, t in new.state_dict().items():
            ours[name].copy_(t)
        self.refresh_weights()

    # ------------------------------------------------------------------------- steps
    @torch.no_grad()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run whole prompts in the expanded form, fill their slots' cache -> last-position logits (B, V) fp32."""
        slots = self._check_slots(slots)
        if len(slots) != len(prompts) or not prompts:
            raise ValueError(f"need one slot per prompt, got {len(slots)} slots for {len(prompts)} prompts")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) > self.max_seq_len:
            raise ValueError(f"prompt lengths {lengths} must be in [1, max_seq_len={self.max_seq_len}]")
        B, T = len(prompts), max(lengths)
        ids = torch.zeros(B, T, dtype=torch.long)  # right-padded: causal attention keeps pads out of real tokens
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        self.model._check_ids(ids)  # on the host: no device sync
        ids = ids.to(self.device)
        slot_idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        cos, sin = rope_cos_sin(self.config, torch.arange(T, device=self.device)[None], self.cache.kv.dtype)
        x = self.model.model.embed_tokens(ids)  # (B, T, H)
        for i, layer in enumerate(self.model.model.layers):
            out, latent = mla_prefill(layer.self_attn, layer.input_layernorm(x), cos, sin)
            self.cache.kv[i, slot_idx, :T] = latent  # pad entries land past each length and are never read
            x = x + out
            h = layer.post_attention_layernorm(x)
            x = x + (layer.mlp(h)[0] if isinstance(layer.mlp, MoE) else layer.mlp(h))
        for s, n in zip(slots, lengths):
            self.cache.lengths[s] = n
        last = torch.as_tensor(lengths, device=self.device) - 1
        hidden = self.model.model.norm(x[torch.arange(B, device=self.device), last])
        return self.model.lm_head(hidden).float()

    @torch.no_grad()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Append one token to each slot's sequence, absorbed form -> next-token logits (B, V) fp32."""
        slots = self._check_slots(slots)
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else [int(t) for t in tokens]
        if len(slots) != len(tokens) or not tokens:
            raise ValueError(f"need one token per slot, got {len(tokens)} tokens for {len(slots)} slots")
        positions = [self.cache.lengths[s] for s in slots]  # where each new token goes
        if min(positions) < 1:
            raise ValueError(f"slots {slots} include one that was never prefilled (or was released)")
        if max(positions) >= self.max_seq_len:
            raise ValueError(f"a sequence would exceed max_seq_len={self.max_seq_len}")
        if min(tokens) < 0 or max(tokens) >= self.vocab_size:
            bad = next(t for t in tokens if not 0 <= t < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        B = len(slots)
        if self._graphs is not None:
            logits = self._graphs(self.weights, self.cache.kv, tokens, slots, positions)
        else:
            ids, slot_idx, pos = torch.tensor([tokens, slots, positions], device=self.device)  # one copy to the device
            first = slots[0] if slots == list(range(slots[0], slots[0] + B)) else None
            logits = self._step(self.weights, self.cache.kv, ids, slot_idx, pos, first, max(positions) + 1)
        for s in slots:
            self.cache.lengths[s] += 1
        return logits

    def release(self, slots: Sequence[int]) -> None:
        """Mark slots free: their cache rows are overwritten by the next prefill, decode on them fails until then."""
        for s in self._check_slots(slots):
            self.cache.lengths[s] = 0

    def _check_slots(self, slots: Sequence[int]) -> list[int]:
        slots = [int(s) for s in slots]
        if any(not 0 <= s < self.max_batch for s in slots) or len(set(slots)) != len(slots):
            raise ValueError(f"slots {slots} must be distinct and in [0, max_batch={self.max_batch})")
        return slots

    # ------------------------------------------------------------------------- generate
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> list[Completion]:
        """Generate for every prompt (in waves of max_batch); `decode` (ids -> text) enables stop strings."""
        params = params or SamplingParams()
        if params.stop and decode is None:
            raise ValueError(f"stop strings {params.stop!r} need a decode function")
        stop_ids = params.stop_token_ids
        if stop_ids is None:
            eos = self.config.eos_token_id
            stop_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        stop_ids = frozenset(stop_ids)
        generators = params.generators(len(prompts))  # drawn before waves: samples do not depend on max_batch
        results = [Completion() for _ in prompts]
        for start in range(0, len(prompts), self.max_batch):
            wave = list(range(start, min(start + self.max_batch, len(prompts))))
            slots = list(range(len(wave)))
            # the last sampled token never enters the cache, so a slot holds prompt + max_new - 1 tokens
            budget = [min(params.max_new_tokens, self.max_seq_len - len(prompts[i]) + 1) for i in wave]
            logits = self.prefill(slots, [prompts[i] for i in wave])
            active = list(range(len(wave)))  # positions in `wave` still generating, rows of `logits`
            while active:
                tokens, logprobs = sample(logits, params, [generators[wave[j]] for j in active])
                still = []
                for j, tok, lp in zip(active, tokens.tolist(), logprobs.tolist()):
                    out = results[wave[j]]
                    out.token_ids.append(tok)
                    out.logprobs.append(lp)
                    if self._finished(out, tok, stop_ids, params, decode, budget[j]):
                        continue
                    still.append(j)
                active = still
                if active:
                    logits = self.decode([slots[j] for j in active], [results[wave[j]].token_ids[-1] for j in active])
            self.release(slots)
        if decode is not None:  # the text never holds what stopped it, as in OpenAI's API
            for out in results:
                if out.text is None:
                    out.text = decode(out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids)
        return results

    @staticmethod
    def _finished(out: Completion, tok: int, stop_ids: frozenset[int], params: SamplingParams,
                  decode: Callable[[list[int]], str] | None, budget: int) -> bool:
        if tok in stop_ids:
            out.finish_reason, out.stop_reason = "stop", tok
            return True
        if params.stop:
            # re-decode the whole continuation: stop strings may span tokens (quadratic, fine at these lengths)
            text = decode(out.token_ids)
            hits = [(text.find(s), s) for s in params.stop if s in text]
            if hits:
                at, s = min(hits)
                out.finish_reason, out.stop_reason, out.text = "stop", s, text[:at]
                return True
        if len(out.token_ids) >= budget:
            out.finish_reason = "length"
            return True
        return False
