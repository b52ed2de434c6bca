import base64
import json

import pytest
import regex

from openk2.data.tokenizer import (
    KIMI_PATTERN,
    SPECIAL_TOKENS,
    _bytes_to_unicode,
    load_tokenizer,
    read_tiktoken_ranks,
    train_tokenizer,
)

TEXT = "Document 1. The experts route each token; café 模型 ✓ 12345\n\n    return x  # end"
CHAT = "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>hi<|im_end|>"


def test_special_tokens_come_first_and_are_single_ids(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for token in SPECIAL_TOKENS:
        assert tokenizer.encode(f"a{token}b")[1:-1] == [tokenizer.token_to_id(token)]
    with pytest.raises(KeyError, match="nope"):
        tokenizer.token_to_id("<|nope|>")


def test_round_trip_with_special_tokens(tokenizer):
    for text in (TEXT, CHAT, CHAT + TEXT, "", " leading and trailing  "):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode(CHAT)
    assert ids[0] == tokenizer.token_to_id("<|im_system|>")
    assert ids.count(tokenizer.token_to_id("<|im_end|>")) == 2
    assert tokenizer.encode_batch([TEXT, CHAT]) == [tokenizer.encode(TEXT), ids]


def test_special_strings_can_be_plain_text(tokenizer):
    plain = tokenizer.encode("<|im_end|>", allow_special=False)
    assert len(plain) > 1 and tokenizer.token_to_id("<|im_end|>") not in plain
    assert tokenizer.decode(plain) == "<|im_end|>"
    assert tokenizer.encode("<|im_end|>") == [2]  # the switch does not stick


def test_vocab_size_and_limits(tokenizer, docs):
    assert 256 + len(SPECIAL_TOKENS) < tokenizer.vocab_size <= 512
    assert max(max(tokenizer.encode(d)) for d in docs) < tokenizer.vocab_size
    with pytest.raises(ValueError, match="vocab_size 100 is too small"):
        train_tokenizer(docs, vocab_size=100, progress=False)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([], vocab_size=512, progress=False)


def test_save_and_load_folder(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = load_tokenizer(path)
        assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (0, 1, tokenizer.vocab_size)
        assert loaded.encode(CHAT + TEXT) == tokenizer.encode(CHAT + TEXT)
        assert loaded.fingerprint == tokenizer.fingerprint


def test_transformers_reads_the_folder(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(CHAT + TEXT, add_special_tokens=False) == tokenizer.encode(CHAT + TEXT)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token) == (0, 1, "[PAD]")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tiktoken.model"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- tiktoken files


def tiktoken_ranks_from(tokenizer) -> dict[bytes, int]:
    """The trained BPE's tokens as tiktoken ranks: bytes first, merges in order (specials dropped)."""
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    vocab = tokenizer.backend.get_vocab(with_added_tokens=False)
    ordered = sorted((i, t) for t, i in vocab.items() if t not in SPECIAL_TOKENS)
    return {bytes(to_byte[c] for c in t): rank for rank, (_, t) in enumerate(ordered)}


def write_tiktoken(path, ranks):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def reference_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm in plain Python: regex pieces, then lowest-rank adjacent merges."""
    ids = []
    for piece in regex.findall(KIMI_PATTERN, text, flags=regex.V1):  # V1: `&&` is set intersection
        parts = [bytes([b]) for b in piece.encode()]
        if piece.encode() in ranks:
            ids.append(ranks[piece.encode()])
            continue
        while True:
            pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            pairs = [p for p in pairs if p[0] is not None]
            if not pairs:
                break
            _, i = min(pairs)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


def test_tiktoken_file_encodes_like_tiktoken(tokenizer, docs, tmp_path):
    ranks = tiktoken_ranks_from(tokenizer)
    write_tiktoken(tmp_path / "tiktoken.model", ranks)
    assert read_tiktoken_ranks(tmp_path / "tiktoken.model") == ranks
    loaded = load_tokenizer(tmp_path)  # a folder holding tiktoken.model
    n = len(ranks)
    for text in [TEXT, *docs[:20], "x" * 50, "ÿ\x00\t\r\n 🙂 中文中文 ABCdef's"]:
        assert loaded.encode(text) == reference_encode(ranks, text), text
        assert loaded.decode(loaded.encode(text)) == text
    # Kimi-K2's special-token layout after the ranks
    assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (n, n + 1, n + 256)
    assert loaded.token_to_id("<|im_end|>") == n + 2
    assert loaded.token_to_id("<|im_middle|>") == n + 17
    assert loaded.token_to_id(f"<|reserved_token_{n + 5}|>") == n + 5
    assert loaded.token_to_id("[PAD]") == n + 255
    assert loaded.encode("hi<|im_end|>")[-1] == n + 2


def test_tiktoken_specials_from_tokenizer_config(tokenizer, tmp_path):
    ranks = tiktoken_ranks_from(tokenizer)
    n = len(ranks)
    write_tiktoken(tmp_path / "vocab.model", ranks)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(n): {"content": "<|start|>"}, str(n + 3): {"content": "<|stop|>"}},
        "bos_token": "<|start|>", "eos_token": {"content": "<|stop|>"},
    }))
    loaded = load_tokenizer(tmp_path / "vocab.model")
    assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (n, n + 3, n + 256)


def test_bad_tiktoken_files_are_named(tmp_path):
    path = tmp_path / "bad.model"
    path.write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"bad.model:2: not a tiktoken line"):
        load_tokenizer(path)
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b + 1}\n" for b in range(256)))
    with pytest.raises(ValueError, match="ranks are not 0..255"):
        load_tokenizer(path)
    path.write_text("YQ== 0\n")
    with pytest.raises(ValueError, match="single bytes have no rank"):
        load_tokenizer(path)
