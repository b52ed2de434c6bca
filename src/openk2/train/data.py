"""From the `[data]` config to batches: corpus → tokenizer → shards, each built once and cached.

The default corpus, a trained tokenizer and the token shards live under `data.cache_dir`; shards are
keyed by the tokenizer and corpus they came from, so changing either builds new ones instead of
reading stale tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from openk2.data import (
    BatchSampler,
    Tokenizer,
    TokenShards,
    corpus_files,
    iter_documents,
    load_tokenizer,
    prepare_default_corpus,
    train_tokenizer,
    validation_batches,
    write_shards,
)
from openk2.data.shards import INDEX
from openk2.train.config import DataSection
from openk2.train.distributed import Distributed


@dataclass
class PretrainData:
    tokenizer: Tokenizer
    shards: TokenShards
    seed: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_batches(self, batch_size: int, seq_len: int) -> BatchSampler:
        """Global (batch_size, seq_len) batches; each rank takes its rows (`Distributed.local_rows`)."""
        return BatchSampler(self.shards, "train", batch_size=batch_size, seq_len=seq_len, seed=self.seed)

    def val_batches(self, batch_size: int, seq_len: int, n: int) -> list[torch.Tensor]:
        batches = validation_batches(self.shards, batch_size=batch_size, seq_len=seq_len, max_batches=n)
        full = [b for b in batches if b.shape[0] == batch_size]  # equal rows on every rank
        if not full:
            raise ValueError(f"the validation split holds fewer than {batch_size} x {seq_len} tokens; "
                             f"raise data.val_fraction or lower train.batch_size / data.seq_len")
        return full


def default_corpus_dir(cfg: DataSection) -> Path:
    return Path(cfg.cache_dir) / "corpus"


def _corpus_paths(cfg: DataSection) -> list[Path]:
    if cfg.corpus:
        return [Path(p) for p in cfg.corpus]
    out = default_corpus_dir(cfg)
    prepare_default_corpus(out)
    return [out]


def _corpus_key(paths: list[Path]) -> str:
    """Identity of a corpus: its files' paths, sizes and modification times."""
    h = hashlib.blake2b(digest_size=8)
    for f in corpus_files(paths):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _tokenizer(cfg: DataSection, paths: list[Path], out: Path) -> Tokenizer:
    """The configured tokenizer, or one trained on the corpus once and cached in `out`."""
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    if (out / "tokenizer.json").exists():
        return load_tokenizer(out)
    print(f"training a {cfg.vocab_size}-token byte-level BPE on {', '.join(map(str, paths))} -> {out}")
    return train_tokenizer(iter_documents(paths), cfg.vocab_size, out)


def prepare_pretrain_data(cfg: DataSection, seed: int, dist: Distributed) -> PretrainData:
    """Build (rank 0) or reuse the corpus, tokenizer and shards the config names; all ranks then open them."""
    if dist.is_main:
        paths = _corpus_paths(cfg)
        corpus_key = _corpus_key(paths)  # stats every corpus file: once
        tokenizer_dir = Path(cfg.cache_dir) / f"tokenizer-{cfg.vocab_size}-{corpus_key}"
        tokenizer = _tokenizer(cfg, paths, tokenizer_dir)
        key = json.dumps([tokenizer.fingerprint, corpus_key, cfg.val_fraction, seed])
        shards_dir = Path(cfg.cache_dir) / f"shards-{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}"
        if not (shards_dir / INDEX).exists():
            write_shards(iter_documents(paths), tokenizer, shards_dir, val_fraction=cfg.val_fraction, seed=seed,
                         force=True)
        location = [str(shards_dir), cfg.tokenizer or str(tokenizer_dir)]
    else:
        location = [None, None]
    if dist.enabled:
        torch.distributed.broadcast_object_list(location, src=0)
    shards_dir, tokenizer_path = location
    tokenizer = tokenizer if dist.is_main else load_tokenizer(tokenizer_path)
    return PretrainData(tokenizer=tokenizer, shards=TokenShards(shards_dir), seed=seed)
