"""Generation engine for K2 models: expanded-MLA prefill, absorbed-MLA decode over a latent cache (spec §1).

The cache keeps, per layer, sequence slot and position, only [c_kv | k^R]: the RMSNorm'd kv latent
(kv_lora_rank) and the rotated shared rope key (qk_rope_head_dim), i.e. (512 + 64) × 2 = 1,152 bytes
per token and layer in bf16 at K2's sizes. Decode never expands it to per-head keys and values: the
key half of kv_b_proj is folded into the query (q^C · W_UK gives a query in latent space) and the
value half into the output (attend over c_kv, then apply W_UV), as DeepSeek-V3's "absorb" inference.

The model's own forward stays the training path; the functions here take its modules and weights.
Read top to bottom: cache → attention (prefill, decode) → layer stack → Engine (prefill, decode, generate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from openk2.model.config import ModelConfig
from openk2.model.model import K2ForCausalLM, MoE, MultiHeadLatentAttention, apply_rope, rope_cos_sin
from openk2.serve.sampling import SamplingParams, sample


# ----------------------------------------------------------------------------- cache
class LatentCache:
    """Preallocated [c_kv | k^R] for every layer, sequence slot and position: (L, slots, T, r + d_rope)."""

    def __init__(self, config: ModelConfig, max_batch: int, max_seq_len: int,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        if max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch and max_seq_len must be >= 1, got {max_batch} and {max_seq_len}")
        self.kv_lora_rank, self.rope_dim = config.kv_lora_rank, config.qk_rope_head_dim
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.kv = torch.zeros(config.num_hidden_layers, max_batch, max_seq_len, width, dtype=dtype, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)  # tokens cached per slot

    @property
    def max_batch(self) -> int:
        return self.kv.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.kv.shape[2]

    @property
    def bytes_per_token_per_layer(self) -> int:
        return self.kv.shape[-1] * self.kv.element_size()


# ----------------------------------------------------------------------------- attention
def _query(attn: MultiHeadLatentAttention, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, H) -> q^C (B, T, nh, d_nope), rotated q^R (B, T, nh, d_rope)."""
    B, T, _ = x.shape
    q = attn.q_proj(x) if attn.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q_nope, q_rope = q.view(B, T, attn.n_heads, attn.d_nope + attn.d_rope).split([attn.d_nope, attn.d_rope], -1)
    return q_nope, apply_rope(q_rope, cos, sin)


def _latent(attn: MultiHeadLatentAttention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """x (B, T, H) -> the cache entries [RMSNorm(c_kv) | rotated k^R] (B, T, r + d_rope)."""
    B, T, _ = x.shape
    c_kv, k_rope = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, attn.d_rope], dim=-1)
    k_rope = apply_rope(k_rope.view(B, T, 1, attn.d_rope), cos, sin).view(B, T, attn.d_rope)
    return torch.cat((attn.kv_a_layernorm(c_kv), k_rope), dim=-1)


def mla_prefill(attn: MultiHeadLatentAttention, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """Expanded MLA over whole prompts (causal): x (B, T, H) -> output (B, T, H), cache entries (B, T, r + d_rope)."""
    B, T, _ = x.shape
    nh, r = attn.n_heads, attn.kv_lora_rank
    q_nope, q_rope = _query(attn, x, cos, sin)
    latent = _latent(attn, x, cos, sin)
    c_kv, k_rope = latent.split([r, attn.d_rope], dim=-1)
    k_nope, v = attn.kv_b_proj(c_kv).view(B, T, nh, attn.d_nope + attn.d_v).split([attn.d_nope, attn.d_v], -1)
    q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # (B, nh, T, d_qk)
    k = torch.cat((k_nope, k_rope[:, :, None].expand(-1, -1, nh, -1)), dim=-1).transpose(1, 2)
    pad = max(q.shape[-1] - attn.d_v, 0)  # fused kernels want one head dim for q, k and v: zero-pad v, drop it after
    y = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)).transpose(1, 2), is_causal=True,
                                       scale=attn.softmax_scale)[..., : attn.d_v]  # (B, nh, T, d_v)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, nh * attn.d_v)), latent


def mla_decode(attn: MultiHeadLatentAttention, x: torch.Tensor, cos, sin, cache: torch.Tensor,
               slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Absorbed MLA for one new token per sequence (DeepSeek-V3 inference, "absorb").

    x (B, 1, H); cache (slots, T_max, r + d_rope) of this layer; each sequence b writes its entry at
    positions[b] and attends to its positions 0..positions[b]. Returns (B, 1, H).
    """
    B = x.shape[0]
    nh, r = attn.n_heads, attn.kv_lora_rank
    q_nope, q_rope = _query(attn, x, cos, sin)  # (B, 1, nh, ·)
    cache[slots, positions] = _latent(attn, x, cos, sin)[:, 0]
    T = int(positions.max()) + 1
    kv = cache[slots, :T]  # (B, T, r + d_rope): a gather, the only per-step copy of the cache
    c_kv, k_rope = kv.split([r, attn.d_rope], dim=-1)
    w = attn.kv_b_proj.weight.view(nh, attn.d_nope + attn.d_v, r)
    w_uk, w_uv = w[:, : attn.d_nope], w[:, attn.d_nope:]  # (nh, d_nope, r), (nh, d_v, r)
    q_latent = torch.einsum("bhd,hdc->bhc", q_nope[:, 0], w_uk)  # q^C · W_UK: the query in latent space
    scores = torch.einsum("bhc,btc->bht", q_latent, c_kv) + torch.einsum("bhr,btr->bht", q_rope[:, 0], k_rope)
    past = torch.arange(T, device=x.device)[None] <= positions[:, None]  # (B, T) each sequence's own length
    scores = (scores * attn.softmax_scale).masked_fill(~past[:, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(x.dtype)  # (B, nh, T)
    y = torch.einsum("bht,btc->bhc", probs, c_kv)  # attend over the latents ...
    y = torch.einsum("bhc,hdc->bhd", y, w_uv)  # ... then W_UV: (B, nh, d_v)
    return attn.o_proj(y.reshape(B, 1, nh * attn.d_v))


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
    `prefill` and `decode` are the step-level API a scheduler (continuous batching) drives.
    """

    def __init__(self, model: K2ForCausalLM, max_batch: int = 8, max_seq_len: int = 2048):
        self.model = model.eval()
        self.config = model.config
        p = next(model.parameters())
        self.cache = LatentCache(self.config, max_batch, max_seq_len, dtype=p.dtype, device=p.device)
        self.device = p.device

    # ------------------------------------------------------------------------- steps
    @torch.no_grad()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run whole prompts in the expanded form, fill their slots' cache -> last-position logits (B, V) fp32."""
        if len(slots) != len(prompts) or not prompts:
            raise ValueError(f"need one slot per prompt, got {len(slots)} slots for {len(prompts)} prompts")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) > self.cache.max_seq_len:
            raise ValueError(f"prompt lengths {lengths} must be in [1, max_seq_len={self.cache.max_seq_len}]")
        B, T = len(prompts), max(lengths)
        ids = torch.zeros(B, T, dtype=torch.long)  # right-padded: causal attention keeps pads out of real tokens
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        self.model._check_ids(ids)
        slot_idx = torch.as_tensor(list(slots), dtype=torch.long, device=self.device)
        cos, sin = rope_cos_sin(self.config, torch.arange(T, device=self.device)[None], self.cache.kv.dtype)
        x = self.model.model.embed_tokens(ids)  # (B, T, H)
        for i, layer in enumerate(self.model.model.layers):
            out, latent = mla_prefill(layer.self_attn, layer.input_layernorm(x), cos, sin)
            self.cache.kv[i, slot_idx, :T] = latent  # pad entries land past each length and are never read
            x = self._mlp(layer, x + out)
        last = torch.as_tensor(lengths, device=self.device) - 1
        self.cache.lengths[slot_idx] = last + 1
        return self._logits(x[torch.arange(B, device=self.device), last])

    @torch.no_grad()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Append one token to each slot's sequence, absorbed form -> next-token logits (B, V) fp32."""
        if len(slots) != len(tokens) or not tokens:
            raise ValueError(f"need one token per slot, got {len(tokens)} tokens for {len(slots)} slots")
        slot_idx = torch.as_tensor(list(slots), dtype=torch.long, device=self.device)
        positions = self.cache.lengths[slot_idx]  # (B,) where each new token goes
        if int(positions.min()) < 1:
            raise ValueError(f"slots {list(slots)} include one that was never prefilled")
        if int(positions.max()) >= self.cache.max_seq_len:
            raise ValueError(f"a sequence would exceed max_seq_len={self.cache.max_seq_len}")
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        self.model._check_ids(ids)
        cos, sin = rope_cos_sin(self.config, positions[:, None], self.cache.kv.dtype)  # (B, 1, 1, d/2)
        x = self.model.model.embed_tokens(ids)
        for i, layer in enumerate(self.model.model.layers):
            x = x + mla_decode(layer.self_attn, layer.input_layernorm(x), cos, sin, self.cache.kv[i], slot_idx,
                               positions)
            x = self._mlp(layer, x)
        self.cache.lengths[slot_idx] = positions + 1
        return self._logits(x[:, 0])

    @staticmethod
    def _mlp(layer, x: torch.Tensor) -> torch.Tensor:
        h = layer.post_attention_layernorm(x)
        return x + (layer.mlp(h)[0] if isinstance(layer.mlp, MoE) else layer.mlp(h))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden)).float()

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
        for start in range(0, len(prompts), self.cache.max_batch):
            wave = list(range(start, min(start + self.cache.max_batch, len(prompts))))
            slots = list(range(len(wave)))
            # the last sampled token never enters the cache, so a slot holds prompt + max_new - 1 tokens
            budget = [min(params.max_new_tokens, self.cache.max_seq_len - len(prompts[i]) + 1) for i in wave]
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
