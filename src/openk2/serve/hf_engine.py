"""Generation engine for any transformers causal LM, with a per-slot KV cache (issue 5 "other models").

Same step API as `openk2.serve.engine.Engine` (prefill / decode / release / load_weights), so the
server and RL drive either. Continuous batching needs one forward over any mix of slots at
different lengths; transformers' own caches hold one length for the whole batch, so `SlotCache`
is a `Cache` whose layers keep a row per slot: each forward writes every row's new keys/values at
that row's own positions and hands attention back just the rows in use, (B, n_kv, T, d) with T the
longest of them. What each row may see goes in as an explicit 4-D mask (B, 1, q, T), and RoPE gets
per-row `position_ids`; the model's forward is otherwise untouched.

On a CPU, decode of Llama-family models (llama, mistral without a window, qwen2) skips transformers' forward:
`fused_decode` runs the same arithmetic, a dozen torch ops per layer over the same cache, with every linear
prepacked for oneDNN (`openk2.serve.packed_linear`): a decode step streams all the weights from DRAM, and the
packed layout streams them ~2x faster. Prefill, where the matmuls are large, stays the model's forward.
Read top to bottom: cache layer -> cache -> masks -> fused decode -> HFEngine.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from openk2.serve.packed_linear import PackedLinear, pack_linears

# layer types (config.layer_types) whose attention reads a KV cache that this engine can lay out per slot
ATTENTION_TYPES = ("full_attention", "sliding_attention")
GQA_SDPA = "openk2_gqa_sdpa"  # what an "sdpa" model is switched to; see gqa_sdpa
MASKABLE_ATTENTION = ("sdpa", "eager", GQA_SDPA)  # the implementations that take an arbitrary 4-D mask


def gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA under the engine's explicit mask, reading grouped K/V heads in place (`enable_gqa`).

    transformers' "sdpa" repeats K/V once per query head whenever a mask is given (its CUDA kernels need that);
    over long caches that copy costs more than attention itself: 293 ms against 22 ms for one layer of 64 rows
    x 1,500 cached tokens with SmolLM2's 9 query / 3 KV heads on this CPU. query (B, nh, q, d), key (B, nkv, T, d).
    """
    # no mask (a plain forward outside the engine): causal as transformers' own sdpa decides it
    causal = attention_mask is None and query.shape[2] > 1 and (
        is_causal if is_causal is not None else getattr(module, "is_causal", True))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         is_causal=causal, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None  # (B, q, nh, d), as transformers' attention functions return


# ----------------------------------------------------------------------------- cache
@dataclass
class SlotStep:
    """Where one forward reads and writes: rows `slots` (B,), new tokens at `positions` (B, q), keys 0..kv_len-1."""

    slots: torch.Tensor
    positions: torch.Tensor
    kv_len: int
    first: int | None  # slots are first, first+1, ... : read them as a view instead of a gather


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot: (max_batch, n_kv, max_seq_len, d), allocated on first use."""

    is_sliding = False

    def __init__(self, max_batch: int, max_seq_len: int):
        super().__init__()
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # zeros, not empty: masked-out positions still meet the values in probs @ V, and 0 * nan is nan
        n_kv, dk, dv = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        self.keys = key_states.new_zeros(self.max_batch, n_kv, self.max_seq_len, dk)
        self.values = value_states.new_zeros(self.max_batch, n_kv, self.max_seq_len, dv)
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: SlotStep | None = None,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, n_kv, q, d) at each row's positions; return the rows' keys and values (B, n_kv, kv_len, d)."""
        if step is None:
            raise ValueError("SlotLayer.update needs the SlotStep of the forward; run the model through HFEngine")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows = step.slots[:, None]  # (B, 1) broadcasts against positions (B, q)
        # advanced indices split by a slice put their broadcast dims first: the target is (B, q, n_kv, d)
        self.keys[rows, :, step.positions] = key_states.transpose(1, 2)
        self.values[rows, :, step.positions] = value_states.transpose(1, 2)
        if step.first is not None:
            end = step.first + step.slots.shape[0]
            return self.keys[step.first:end, :, : step.kv_len], self.values[step.first:end, :, : step.kv_len]
        return self.keys[step.slots, :, : step.kv_len], self.values[step.slots, :, : step.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_seq_len, 0

    def get_seq_length(self) -> int:
        return 0  # rows differ in length; the engine always passes position_ids and a 4-D mask

    def get_max_length(self) -> int:
        return self.max_seq_len


class SlotCache(Cache):
    """A transformers `Cache` of `SlotLayer`s; `HFEngine` sets `step` before each forward."""

    def __init__(self, num_layers: int, max_batch: int, max_seq_len: int):
        super().__init__(layers=[SlotLayer(max_batch, max_seq_len) for _ in range(num_layers)])
        self.step: SlotStep | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx].update(key_states, value_states, self.step)


# ----------------------------------------------------------------------------- masks
def slot_mask(positions: torch.Tensor, kv_len: int, window: int | None = None) -> torch.Tensor:
    """Which keys each query sees: (B, 1, q, kv_len) bool, key t visible from position p iff p - window < t <= p."""
    t = torch.arange(kv_len, device=positions.device)[None, None, :]
    p = positions[:, :, None]  # (B, q, 1)
    visible = t <= p
    if window is not None:
        visible &= t > p - window
    return visible[:, None]


# ----------------------------------------------------------------------------- fused decode (Llama family)
FUSED_MODEL_TYPES = ("llama", "mistral", "qwen2")  # pre-norm, SwiGLU, GQA, rotate-half RoPE, optional q/k/v bias
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position alone


@dataclass
class FusedLayer:
    """One decoder layer for `fused_decode`: the model's norms, its linears packed (q/k/v and gate/up stacked)."""

    norm: torch.nn.Module  # input_layernorm
    qkv: PackedLinear  # [q_proj | k_proj | v_proj] rows, with their biases when the model has them
    o: PackedLinear
    post_norm: torch.nn.Module  # post_attention_layernorm
    gate_up: PackedLinear  # [gate_proj | up_proj] rows
    down: PackedLinear


@dataclass
class FusedWeights:
    """The decode step's weights: the model's norms and embedding as they are, its linears prepacked (copies)."""

    embed: torch.Tensor
    layers: list[FusedLayer]
    norm: torch.nn.Module
    lm_head: PackedLinear
    cos: torch.Tensor  # (max_seq_len, head_dim): the model's own rotary table at every position
    sin: torch.Tensor
    position_ids: torch.Tensor  # arange(max_seq_len), for the masks
    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float


def fuse_llama(model: PreTrainedModel, max_seq_len: int) -> FusedWeights | None:
    """The fused decode's weights for a Llama-family model on a CPU with oneDNN; None for anything else (then the
    engine decodes through transformers' forward)."""
    config = model.config.get_text_config()
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    body = getattr(model, "model", None)
    if (config.model_type not in FUSED_MODEL_TYPES or getattr(config, "hidden_act", None) != "silu"
            or getattr(config, "pretraining_tp", 1) != 1 or rope.get("rope_type", "default") not in STATIC_ROPE_TYPES
            or "sliding_attention" in (getattr(config, "layer_types", None) or ())
            or (config.model_type == "mistral" and getattr(config, "sliding_window", None))
            or body is None or not hasattr(body, "rotary_emb")):
        return None
    linears = []
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if (hasattr(attn, "q_norm") or attn.o_proj.bias is not None
                or any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj"))):
            return None
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        bias = None if qkv[0].bias is None else torch.cat([m.bias for m in qkv])
        linears += [(torch.cat([m.weight for m in qkv]), bias), (attn.o_proj.weight, None),
                    (torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)), None), (mlp.down_proj.weight, None)]
    head = model.get_output_embeddings().weight
    packed = pack_linears(linears + [(head, None)])
    if packed is None:
        return None
    layers = [FusedLayer(layer.input_layernorm, *packed[4 * i: 4 * i + 2], layer.post_attention_layernorm,
                         *packed[4 * i + 2: 4 * i + 4]) for i, layer in enumerate(body.layers)]
    positions = torch.arange(max_seq_len, device=head.device)
    cos, sin = body.rotary_emb(head[:1], positions[None])  # scaling and attention factor as the model applies them
    attn = body.layers[0].self_attn
    return FusedWeights(embed=body.embed_tokens.weight, layers=layers, norm=body.norm, lm_head=packed[-1],
                        cos=cos[0], sin=sin[0], position_ids=positions,
                        n_heads=config.num_attention_heads, n_kv=config.num_key_value_heads, head_dim=attn.head_dim,
                        scaling=attn.scaling)


def rope_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama's layout, not DeepSeek's interleaved pairs) as one matrix per row: x @ R[b] =
    x·cos + rotate_half(x)·sin, so a decode step rotates every head of every layer with one bmm each.
    cos, sin (B, d) -> (B, d, d); built per step, since a table of them for every position is d times larger."""
    d = cos.shape[-1]
    h = d // 2
    R = torch.diag_embed(cos)
    i = torch.arange(h, device=cos.device)
    R[:, i + h, i] = -sin[:, i]  # out[i] gets -x[i+h]·sin[i]
    R[:, i, i + h] = sin[:, i + h]  # out[i+h] gets x[i]·sin[i+h]
    return R


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm (the packed path is fp32 only, where it is one fused op)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def fused_decode(f: FusedWeights, cache: SlotCache, ids: torch.Tensor, step: SlotStep) -> torch.Tensor:
    """One token per row through the whole model -> logits (B, V) fp32; the same cache writes as the forward."""
    B = ids.shape[0]
    nh, nkv, d = f.n_heads, f.n_kv, f.head_dim
    pos = step.positions[:, 0]
    rope = rope_matrices(f.cos[pos], f.sin[pos])  # (B, d, d)
    mask = (f.position_ids[: step.kv_len] <= pos[:, None])[:, None, None]  # (B, 1, 1, T)
    rows = step.slots if step.first is None else slice(step.first, step.first + B)
    x = F.embedding(ids, f.embed)  # (B, H)
    for w, layer in zip(f.layers, cache.layers):
        qk, v = w.qkv(_rms_norm(w.norm, x)).split([(nh + nkv) * d, nkv * d], dim=-1)
        qk = torch.bmm(qk.view(B, nh + nkv, d), rope)  # q's heads, then k's: one rotation for both
        layer.keys[step.slots, :, pos] = qk[:, nh:]
        layer.values[step.slots, :, pos] = v.view(B, nkv, d)
        keys, values = layer.keys[rows, :, : step.kv_len], layer.values[rows, :, : step.kv_len]
        y = F.scaled_dot_product_attention(qk[:, :nh, None], keys, values, attn_mask=mask, scale=f.scaling,
                                           enable_gqa=nh != nkv)  # (B, nh, 1, d)
        x = w.o.add_to(x, y.reshape(B, nh * d))
        g, u = w.gate_up(_rms_norm(w.post_norm, x)).chunk(2, dim=-1)
        x = w.down.add_to(x, F.silu(g) * u)
    return f.lm_head(_rms_norm(f.norm, x)).float()


# ----------------------------------------------------------------------------- engine
class HFEngine:
    """Batched, slot-addressed generation steps for a transformers causal LM: `HFEngine.from_pretrained(path)`.

    A slot is a row of the cache; `prefill` (re)starts slots from whole prompts, `decode` appends one
    token to any subset of slots. Right-padded prefill is safe: pad keys land past each prompt's end,
    are never visible to its tokens, and the slot's next token overwrites them. `fused=False` decodes through
    transformers' forward even for the Llama family (see `fused_decode`).
    """

    def __init__(self, model: PreTrainedModel, max_batch: int = 8, max_seq_len: int = 2048, fused: bool = True):
        if max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch and max_seq_len must be >= 1, got {max_batch} and {max_seq_len}")
        config = model.config.get_text_config()
        attn = model.config._attn_implementation
        if attn not in MASKABLE_ATTENTION:
            raise ValueError(f"attention implementation {attn!r} takes no 4-D mask; load the model with "
                             f"attn_implementation in {MASKABLE_ATTENTION}")
        self.layer_types = tuple(getattr(config, "layer_types", None) or ())
        unknown = sorted(set(self.layer_types) - set(ATTENTION_TYPES))
        if unknown:
            raise ValueError(f"{type(model).__name__} has layer types {unknown}; HFEngine serves {ATTENTION_TYPES}")
        self.model = model.eval()
        self.window = getattr(config, "sliding_window", None) if "sliding_attention" in self.layer_types else None
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._float_mask = attn == "eager"  # eager adds the mask to the scores; sdpa takes booleans as they are
        if attn == "sdpa":
            AttentionInterface.register(GQA_SDPA, gqa_sdpa)
            AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)
            model.set_attn_implementation(GQA_SDPA)
        self.cache = SlotCache(config.num_hidden_layers, max_batch, max_seq_len)
        # transformers renamed forward's `past_key_values` to `cache` (5.2x); take the name this version has
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.lengths = [0] * max_batch  # tokens cached per slot; 0 = empty
        self.fused = fuse_llama(model, max_seq_len) if fused else None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, max_batch: int = 8,
                        max_seq_len: int | None = None) -> HFEngine:
        """Load a checkpoint folder; defaults: CUDA when present, fp32 on CPU / bf16 on GPU, the model's context
        up to 2048."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
        if max_seq_len is None:
            max_seq_len = min(2048, getattr(model.config.get_text_config(), "max_position_embeddings", 2048))
        return cls(model, max_batch=max_batch, max_seq_len=max_seq_len)

    # ------------------------------------------------------------------------- steps
    @torch.no_grad()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run whole prompts into their slots (overwriting them) -> next-token logits (B, V) fp32."""
        if len(slots) != len(prompts) or not prompts:
            raise ValueError(f"need one slot per prompt, got {len(slots)} slots for {len(prompts)} prompts")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) > self.max_seq_len:
            raise ValueError(f"prompt lengths {lengths} must be in [1, max_seq_len={self.max_seq_len}]")
        self._check_slots(slots)
        B, T = len(prompts), max(lengths)
        ids = torch.zeros(B, T, dtype=torch.long)  # right-padded with token 0
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        positions = torch.arange(T).expand(B, T)
        last = torch.as_tensor(lengths)[:, None] - 1  # (B, 1) each prompt's last position
        logits = self._forward(slots, ids, positions, T, keep=last)
        for s, n in zip(slots, lengths):
            self.lengths[s] = n
        return logits

    @torch.no_grad()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Append one token to each slot (any mix of slots and lengths) -> next-token logits (B, V) fp32."""
        if len(slots) != len(tokens) or not tokens:
            raise ValueError(f"need one token per slot, got {len(tokens)} tokens for {len(slots)} slots")
        self._check_slots(slots)
        positions = [self.lengths[s] for s in slots]  # where each new token goes
        if min(positions) < 1:
            raise ValueError(f"slots {list(slots)} include one that was never prefilled (or was released)")
        if max(positions) >= self.max_seq_len:
            raise ValueError(f"a sequence in slots {list(slots)} would exceed max_seq_len={self.max_seq_len}")
        ids = torch.as_tensor(list(tokens), dtype=torch.long)[:, None]  # (B, 1)
        kv_len, positions = max(positions) + 1, torch.as_tensor(positions)[:, None]
        if self.fused is not None:
            step = self._slot_step(slots, positions, kv_len)
            logits = fused_decode(self.fused, self.cache, ids[:, 0].to(self.device), step)
        else:
            logits = self._forward(slots, ids, positions, kv_len, keep=1)
        for s in slots:
            self.lengths[s] += 1
        return logits

    def release(self, slots: Sequence[int]) -> None:
        """Mark slots empty; their rows are overwritten by the next prefill."""
        self._check_slots(slots)
        for s in slots:
            self.lengths[s] = 0

    @torch.no_grad()
    def load_weights(self, path: str | os.PathLike) -> None:
        """Replace the weights in place from a checkpoint folder of the same architecture; empties every slot."""
        fresh = type(self.model).from_pretrained(path, dtype=self.dtype)
        new, own = fresh.state_dict(), self.model.state_dict()
        if new.keys() != own.keys():
            diff = sorted(set(new) ^ set(own))
            raise ValueError(f"{path}: weights do not match the served model; differing keys {diff[:5]} ({len(diff)})")
        wrong = [(k, tuple(new[k].shape), tuple(t.shape)) for k, t in own.items() if new[k].shape != t.shape]
        if wrong:
            raise ValueError(f"{path}: weight shapes differ from the served model (name, file, served): {wrong[:5]}")
        for k, t in own.items():
            t.copy_(new[k])  # tied weights are one tensor under two names: copied twice, same values
        if self.fused is not None:  # the packed linears are copies: pack the new weights
            self.fused = fuse_llama(self.model, self.max_seq_len)
        self.lengths = [0] * self.max_batch  # cached keys/values came from the old weights

    # ------------------------------------------------------------------------- internals
    def _check_slots(self, slots: Sequence[int]) -> None:
        if len(set(slots)) != len(slots) or any(not 0 <= s < self.max_batch for s in slots):
            raise ValueError(f"slots {list(slots)} must be distinct and in [0, max_batch={self.max_batch})")

    def _slot_step(self, slots: Sequence[int], positions: torch.Tensor, kv_len: int) -> SlotStep:
        first = slots[0] if list(slots) == list(range(slots[0], slots[0] + len(slots))) else None
        return SlotStep(torch.as_tensor(list(slots), device=self.device), positions.to(self.device), kv_len, first)

    def _forward(self, slots: Sequence[int], ids: torch.Tensor, positions: torch.Tensor, kv_len: int,
                 keep: int | torch.Tensor) -> torch.Tensor:
        """One model forward over rows `slots`: ids and positions (B, q) -> logits at `keep` (B, V) fp32."""
        dev = self.device
        self.cache.step = self._slot_step(slots, positions, kv_len)
        positions = self.cache.step.positions
        mask = self._mask(slot_mask(positions, kv_len))
        if self.layer_types:  # models with layer_types take one mask per attention type
            mask = {"full_attention": mask}
            if self.window is not None:
                mask["sliding_attention"] = self._mask(slot_mask(positions, kv_len, self.window))
        keep = keep.to(dev) if isinstance(keep, torch.Tensor) else keep
        out = self.model(input_ids=ids.to(dev), attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=keep, **{self._cache_arg: self.cache})
        self.cache.step = None
        logits = out.logits
        if logits.dim() == 4:  # older transformers index every row with the whole (B, 1) keep: (B, B, 1, V)
            rows = torch.arange(logits.shape[0], device=logits.device)
            logits = logits[rows, rows]  # (B, 1, V): each row at its own position
        return logits[:, -1].float()

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        if not self._float_mask:
            return visible
        return torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~visible, torch.finfo(self.dtype).min)
