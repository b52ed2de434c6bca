"""Tokenised shards (paper §2.4, in small): memory-mapped token arrays, a validation split, resumable batches.

On-disk form of a shards folder:
    train-00000.bin, ...   raw little-endian token ids (uint16 when the vocabulary fits, else uint32),
    val-00000.bin, ...     every document followed by EOS; a document may run across two shards
    index.json             format, dtype, eos/bos ids, tokenizer fingerprint, split seed and fraction, and per
                           split: documents, tokens, shards [{file, tokens, blake2b}]
Every file is written to a temp name and renamed, and index.json last, so a crash leaves no folder that
looks complete. Opening checks each shard's size (always) and blake2b (by default) and names a bad shard.

The split is per document and deterministic: a document is held out when a seeded hash of its text falls
below val_fraction, so a duplicate never lands on both sides.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from openk2.data.tokenizer import Tokenizer

PathLike = str | os.PathLike

INDEX = "index.json"
SHARDS_FORMAT = "openk2-shards/1"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 26  # 128 MiB of uint16 per shard (our choice)
ENCODE_BATCH_DOCS = 256
_HASH_CHUNK = 1 << 23


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _in_val(text: str, seed: int, val_fraction: float) -> tuple[bool, float]:
    """(held out?, the document's seeded hash in [0, 1))."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             salt=seed.to_bytes(8, "little", signed=True)).digest()
    u = int.from_bytes(digest, "little") / 2**64
    return u < val_fraction, u


def _file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _SplitWriter:
    """Buffers one split's tokens and writes full shards atomically, hashing as it writes."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.documents = 0
        self.tokens = 0
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        self.buffer.append(ids)
        self.buffered += len(ids)
        self.documents += 1
        self.tokens += len(ids)
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> dict:
        if self.buffered:
            self._flush(self.buffered)
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}

    def _flush(self, n: int) -> None:
        tokens = np.concatenate(self.buffer)
        head, rest = tokens[:n], tokens[n:]
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)
        name = f"{self.split}-{len(self.shards):05d}.bin"
        tmp = self.out_dir / f".{name}.tmp"
        data = head.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out_dir / name)
        self.shards.append({"file": name, "tokens": n, "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()})


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _clear(out_dir: Path) -> None:
    """Remove a previous shards folder's files: index first, so nothing half-replaced looks valid."""
    (out_dir / INDEX).unlink(missing_ok=True)
    for pattern in ("train-*.bin", "val-*.bin", ".*.tmp"):
        for path in out_dir.glob(pattern):
            path.unlink()


def write_shards(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: PathLike,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenise documents into train/val shards in out_dir and return the index.

    Special-token strings inside documents are encoded as plain text. If no document hashes into val
    (a tiny corpus), the one closest to the threshold is held out, so val is never empty when
    val_fraction > 0. Raises FileExistsError when out_dir already holds shards, unless force."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    out_dir = Path(out_dir)
    if (out_dir / INDEX).exists() and not force:
        raise FileExistsError(f"{out_dir} already holds shards ({INDEX}); pass force=True to rebuild")
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: _SplitWriter(out_dir, split, dtype, shard_tokens) for split in SPLITS}
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    held: tuple[float, np.ndarray] | None = None  # the train document closest to the val threshold
    bar = tqdm(desc="tokenise", unit="doc", disable=not progress)
    for batch in _batched(documents, ENCODE_BATCH_DOCS):
        for text, ids in zip(batch, tokenizer.encode_batch(batch, allow_special=False), strict=True):
            if not ids:
                continue
            tokens = np.concatenate([np.asarray(ids, dtype=np.int64), eos])
            in_val, u = _in_val(text, seed, val_fraction)
            if in_val:
                writers["val"].add(tokens)
            elif val_fraction > 0 and (held is None or u < held[0]):
                if held is not None:
                    writers["train"].add(held[1])
                held = (u, tokens)
            else:
                writers["train"].add(tokens)
        bar.update(len(batch))
        bar.set_postfix(tokens=writers["train"].tokens + writers["val"].tokens)
    bar.close()
    if held is not None:
        writers["val" if writers["val"].documents == 0 else "train"].add(held[1])
    splits = {split: writer.close() for split, writer in writers.items()}
    if splits["train"]["documents"] == 0:
        raise ValueError(f"no training documents for {out_dir}: corpus empty, or every document went to val "
                         f"(val_fraction {val_fraction}, {splits['val']['documents']} documents)")
    index = {
        "format": SHARDS_FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "tokenizer": tokenizer.fingerprint,
        "seed": seed,
        "val_fraction": val_fraction,
        "splits": splits,
    }
    tmp = out_dir / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out_dir / INDEX)
    return index


@dataclass
class _Split:
    arrays: list[np.ndarray]  # one memmap per shard
    starts: np.ndarray  # (n_shards + 1,) cumulative token offsets
    documents: int

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])


class TokenShards:
    """An opened shards folder: memory-mapped splits read as one token stream each."""

    def __init__(self, path: PathLike, *, verify: bool = True):
        """Open path/index.json; checks every shard's size, and its blake2b when verify."""
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.exists():
            raise FileNotFoundError(f"no shards in {self.path}: {INDEX} is missing")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != SHARDS_FORMAT:
            raise ValueError(f"{index_path}: format {self.index.get('format')!r}, expected {SHARDS_FORMAT!r}")
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.eos_id: int = self.index["eos_id"]
        self.splits: dict[str, _Split] = {}
        for name, split in self.index["splits"].items():
            arrays = [self._open_shard(shard, verify) for shard in split["shards"]]
            starts = np.cumsum([0] + [len(a) for a in arrays])
            self.splits[name] = _Split(arrays, starts, split["documents"])
        # identifies the data a sampler state belongs to
        self.fingerprint = hashlib.blake2b(
            "".join(s["blake2b"] for sp in self.index["splits"].values() for s in sp["shards"]).encode(),
            digest_size=8).hexdigest()

    def _open_shard(self, shard: dict, verify: bool) -> np.ndarray:
        path = self.path / shard["file"]
        if not path.exists():
            raise FileNotFoundError(f"shard {path} is missing")
        expected = shard["tokens"] * self.dtype.itemsize
        size = path.stat().st_size
        if size != expected:
            raise ValueError(f"shard {path} is truncated or corrupt: {size} bytes, index says {expected}")
        if verify and (digest := _file_hash(path)) != shard["blake2b"]:
            raise ValueError(f"shard {path} is corrupt: blake2b {digest} != {shard['blake2b']} in {INDEX}")
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["tokens"],))

    def split(self, name: str) -> _Split:
        if name not in self.splits:
            raise KeyError(f"no split {name!r} in {self.path} (have {', '.join(self.splits)})")
        return self.splits[name]

    def num_tokens(self, split: str) -> int:
        return self.split(split).num_tokens

    def read(self, split: str, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of a split's stream, across shard boundaries; int64."""
        s = self.split(split)
        if start < 0 or start + length > s.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside split {split!r} of {s.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(s.starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(s.starts[i])
            n = min(length - done, len(s.arrays[i]) - offset)
            out[done:done + n] = s.arrays[i][offset:offset + n]
            done += n
            i += 1
        return out


class BatchSampler:
    """Deterministic, resumable (B, T) int64 batches of contiguous windows of one split (labels = inputs).

    Each epoch cuts the split into windows of seq_len tokens from a seeded offset in [0, seq_len) and
    visits them in a seeded permutation; an epoch's tail rolls into the next. The cursor (epoch, windows
    used) is `state_dict()`, so a restored sampler yields exactly the batches the original would have.
    batch_size is global: with world_size > 1, each rank gets its own rows of every global batch."""

    def __init__(self, shards: TokenShards, split: str = "train", *, batch_size: int, seq_len: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over world_size {world_size} (rank {rank})")
        num_tokens = shards.num_tokens(split)
        if num_tokens < seq_len:
            raise ValueError(f"split {split!r} of {shards.path} has {num_tokens} tokens, fewer than seq_len {seq_len}")
        self.shards, self.split, self.seed = shards, split, seed
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.epoch, self.position = 0, 0
        self._epoch_cache: tuple[int, int, np.ndarray] | None = None  # (epoch, offset, window order)

    def _windows(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            num_tokens = self.shards.num_tokens(self.split)
            offset = int(rng.integers(min(self.seq_len, num_tokens - self.seq_len + 1)))
            order = rng.permutation((num_tokens - offset) // self.seq_len)
            self._epoch_cache = (epoch, offset, order)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _take(self, n: int) -> list[int]:
        """Start tokens of the next n windows of the global stream, advancing the cursor."""
        starts: list[int] = []
        while len(starts) < n:
            offset, order = self._windows(self.epoch)
            chunk = order[self.position:self.position + n - len(starts)]
            starts.extend(int(offset + w * self.seq_len) for w in chunk)
            self.position += len(chunk)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return starts

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> torch.Tensor:
        starts = self._take(self.batch_size)
        per_rank = self.batch_size // self.world_size
        mine = starts[self.rank * per_rank:(self.rank + 1) * per_rank]
        rows = [self.shards.read(self.split, s, self.seq_len) for s in mine]
        return torch.from_numpy(np.stack(rows))  # (B / world_size, T)

    def state_dict(self) -> dict:
        return {"split": self.split, "seed": self.seed, "seq_len": self.seq_len, "data": self.shards.fingerprint,
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Restore the cursor; the split, seed, seq_len and data must be those the state was saved with."""
        mine = self.state_dict()
        for key in ("split", "seed", "seq_len", "data"):
            if state[key] != mine[key]:
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler {key}={mine[key]!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def validation_batches(shards: TokenShards, *, batch_size: int, seq_len: int, split: str = "val",
                       max_batches: int | None = None) -> Iterator[torch.Tensor]:
    """The split's consecutive seq_len windows from token 0, in (B, T) int64 batches; the last may be smaller."""
    num_windows = shards.num_tokens(split) // seq_len
    if num_windows == 0:
        raise ValueError(f"split {split!r} of {shards.path} has {shards.num_tokens(split)} tokens, "
                         f"fewer than seq_len {seq_len}")
    for b, first in enumerate(range(0, num_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        count = min(batch_size, num_windows - first)
        block = shards.read(split, first * seq_len, count * seq_len)
        yield torch.from_numpy(block.reshape(count, seq_len))  # (B, T)
