"""Sampling parameters and the token sampler: greedy, temperature, top-k, top-p, seeded per sequence.

Logprobs (RL needs the behaviour policy's): with `logprobs="processed"` (the default) a sampled
token's logprob is under the distribution it was actually drawn from, i.e. log-softmax of
logits / temperature after top-k / top-p truncation and renormalisation; greedy decoding
(temperature 0) reports log-softmax of the raw logits (temperature 1). With `logprobs="raw"` every
token's logprob is log-softmax of the raw logits, whatever the sampling settings.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

LOGPROB_MODES = ("processed", "raw")


@dataclass(frozen=True)
class SamplingParams:
    """What to generate for each prompt; one set shared by a `generate` call."""

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None draws a fresh seed; same seed -> same samples
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's eos_token_id(s); () = none
    stop: tuple[str, ...] = ()  # stop strings; need a `decode` function in `generate`
    logprobs: str = "processed"  # see the module docstring

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also catches nan
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs not in LOGPROB_MODES:
            raise ValueError(f"unknown logprobs mode {self.logprobs!r}; expected one of {LOGPROB_MODES}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generators(self, n: int) -> list[torch.Generator]:
        """One generator per sequence, so a sequence's samples do not depend on its batch mates."""
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        master = torch.Generator().manual_seed(seed)
        seeds = torch.randint(0, 2**62, (n,), generator=master).tolist()
        return [torch.Generator().manual_seed(s) for s in seeds]


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, V) logits -> fp32 logits of the sampling distribution: tempered, top-k and top-p masked to -inf."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop = mass_before >= params.top_p  # the top token always stays (mass_before = 0)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits, one generator per row -> sampled token ids (B,) and their logprobs (B,) fp32."""
    raw = torch.log_softmax(logits.float(), dim=-1)
    if params.greedy:
        tokens = logits.argmax(dim=-1)
        return tokens, raw.gather(1, tokens[:, None])[:, 0]
    logp = torch.log_softmax(process_logits(logits, params), dim=-1)  # (B, V)
    probs = logp.exp().cpu()
    tokens = torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])
    tokens = tokens.to(logits.device)
    chosen = (raw if params.logprobs == "raw" else logp).gather(1, tokens[:, None])[:, 0]
    return tokens, chosen
