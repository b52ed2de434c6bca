import json

import numpy as np
import pytest
import torch

from openk2.data.shards import INDEX, BatchSampler, TokenShards, token_dtype, validation_batches, write_shards


@pytest.fixture
def shards_dir(tmp_path, docs, tokenizer):
    write_shards(docs, tokenizer, tmp_path, val_fraction=0.2, seed=3, shard_tokens=500, progress=False)
    return tmp_path


def split_documents(shards: TokenShards, split: str, eos: int) -> list[list[int]]:
    stream = shards.read(split, 0, shards.num_tokens(split)).tolist()
    assert stream[-1] == eos
    docs, current = [], []
    for t in stream:
        if t == eos:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs


def test_round_trip_and_split(shards_dir, docs, tokenizer):
    index = json.loads((shards_dir / INDEX).read_text())
    assert index["dtype"] == "uint16" and index["eos_id"] == 1
    assert len(index["splits"]["train"]["shards"]) > 2  # documents run across shard boundaries
    assert all(s["tokens"] == 500 for s in index["splits"]["train"]["shards"][:-1])
    shards = TokenShards(shards_dir)
    train = split_documents(shards, "train", tokenizer.eos_id)
    val = split_documents(shards, "val", tokenizer.eos_id)
    assert len(train) + len(val) == len(docs) and 5 <= len(val) <= 30
    assert (len(train), len(val)) == (index["splits"]["train"]["documents"], index["splits"]["val"]["documents"])
    decoded_train = {tokenizer.decode(d) for d in train}
    decoded_val = {tokenizer.decode(d) for d in val}
    assert decoded_train | decoded_val == set(docs) and not decoded_train & decoded_val
    assert not list(shards_dir.glob(".*.tmp"))


def test_split_is_deterministic_per_seed(shards_dir, docs, tokenizer, tmp_path_factory):
    again = tmp_path_factory.mktemp("again")
    other = tmp_path_factory.mktemp("other")
    write_shards(docs, tokenizer, again, val_fraction=0.2, seed=3, shard_tokens=500, progress=False)
    write_shards(docs, tokenizer, other, val_fraction=0.2, seed=4, shard_tokens=500, progress=False)
    assert (again / INDEX).read_text() == (shards_dir / INDEX).read_text()
    val = TokenShards(shards_dir).read("val", 0, TokenShards(shards_dir).num_tokens("val"))
    other_val = TokenShards(other).read("val", 0, TokenShards(other).num_tokens("val"))
    assert not np.array_equal(val, other_val)


def test_tiny_corpus_still_gets_a_val_document(tmp_path, docs, tokenizer):
    index = write_shards(docs[:3], tokenizer, tmp_path, val_fraction=0.01, progress=False)
    assert (index["splits"]["train"]["documents"], index["splits"]["val"]["documents"]) == (2, 1)
    index = write_shards(docs[:3], tokenizer, tmp_path, val_fraction=0.0, force=True, progress=False)
    assert (index["splits"]["train"]["documents"], index["splits"]["val"]["documents"]) == (3, 0)


def test_bad_inputs(tmp_path, docs, tokenizer):
    with pytest.raises(ValueError, match="no training documents"):
        write_shards([], tokenizer, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        write_shards(docs, tokenizer, tmp_path / "b", val_fraction=1.0, progress=False)
    write_shards(docs, tokenizer, tmp_path / "c", progress=False)
    with pytest.raises(FileExistsError, match="force=True"):
        write_shards(docs, tokenizer, tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError, match=INDEX):
        TokenShards(tmp_path / "d")


def test_dtype_follows_vocab_size():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(163840) == np.uint32


def test_corrupt_shard_is_named(shards_dir):
    path = shards_dir / "train-00001.bin"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard .*train-00001.bin is corrupt: blake2b"):
        TokenShards(shards_dir)
    TokenShards(shards_dir, verify=False)  # sizes still match: only the checksum can tell


def test_truncated_or_missing_shard_is_named(shards_dir):
    path = shards_dir / "val-00000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="shard .*val-00000.bin is truncated"):
        TokenShards(shards_dir, verify=False)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="val-00000.bin is missing"):
        TokenShards(shards_dir)


def test_read_crosses_shards(shards_dir):
    shards = TokenShards(shards_dir)
    whole = np.concatenate([np.fromfile(p, dtype="<u2") for p in sorted(shards_dir.glob("train-*.bin"))])
    assert np.array_equal(shards.read("train", 490, 30), whole[490:520])
    with pytest.raises(IndexError):
        shards.read("train", len(whole) - 5, 10)


def test_sampler_batches_are_windows_of_the_stream(shards_dir):
    shards = TokenShards(shards_dir)
    stream = shards.read("train", 0, shards.num_tokens("train"))
    batch = next(BatchSampler(shards, batch_size=4, seq_len=32, seed=0))
    assert batch.shape == (4, 32) and batch.dtype == torch.int64
    for row in batch.numpy():
        starts = [i for i in range(len(stream) - 31) if np.array_equal(stream[i:i + 32], row)]
        assert starts


def take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_sampler_is_deterministic_and_resumes_exactly(shards_dir):
    shards = TokenShards(shards_dir)

    def make(seed=7):
        return BatchSampler(shards, batch_size=3, seq_len=40, seed=seed)

    windows_per_epoch = shards.num_tokens("train") // 40
    steps = 2 * windows_per_epoch // 3 + 5  # runs through two epoch boundaries
    reference = take(make(), steps)
    assert all(torch.equal(a, b) for a, b in zip(reference, take(make(), steps), strict=True))
    assert not torch.equal(torch.stack(reference[:4]), torch.stack(take(make(seed=8), 4)))
    # the first epoch visits every window once
    first_epoch = torch.cat(reference)[:windows_per_epoch]
    assert len({tuple(r.tolist()) for r in first_epoch}) == windows_per_epoch

    for cut in (1, windows_per_epoch // 3, steps - 3):
        original = make()
        take(original, cut)
        state = json.loads(json.dumps(original.state_dict()))  # survives a JSON round trip
        resumed = make()
        resumed.load_state_dict(state)
        for a, b in zip(take(resumed, steps - cut), reference[cut:], strict=True):
            assert torch.equal(a, b)


def test_sampler_state_must_match(shards_dir):
    shards = TokenShards(shards_dir)
    state = BatchSampler(shards, batch_size=2, seq_len=16, seed=0).state_dict()
    with pytest.raises(ValueError, match="seq_len=16"):
        BatchSampler(shards, batch_size=2, seq_len=32, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0"):
        BatchSampler(shards, batch_size=2, seq_len=16, seed=1).load_state_dict(state)


def test_sampler_ranks_split_the_global_batch(shards_dir):
    shards = TokenShards(shards_dir)
    whole = take(BatchSampler(shards, batch_size=4, seq_len=16, seed=2), 5)
    parts = [take(BatchSampler(shards, batch_size=4, seq_len=16, seed=2, rank=r, world_size=2), 5) for r in (0, 1)]
    for step in range(5):
        assert torch.equal(torch.cat([parts[0][step], parts[1][step]]), whole[step])
    with pytest.raises(ValueError, match="world_size"):
        BatchSampler(shards, batch_size=3, seq_len=16, world_size=2)


def test_validation_batches(shards_dir):
    shards = TokenShards(shards_dir)
    seq_len = 16
    n = shards.num_tokens("val") // seq_len
    batches = list(validation_batches(shards, batch_size=4, seq_len=seq_len))
    assert [b.shape[0] for b in batches] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    assert torch.equal(torch.cat(batches).flatten(), torch.from_numpy(shards.read("val", 0, n * seq_len)))
    assert len(list(validation_batches(shards, batch_size=4, seq_len=seq_len, max_batches=2))) == 2
    again = validation_batches(shards, batch_size=4, seq_len=seq_len)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        next(validation_batches(shards, batch_size=4, seq_len=10**6))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        BatchSampler(shards, "val", batch_size=1, seq_len=10**6)
