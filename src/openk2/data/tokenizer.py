"""Tokenizers (paper §2.3, spec §1 and §4): byte-level BPE with K2's special tokens, and K2's own tiktoken file.

Everything else in openk2 sees one small interface, `Tokenizer`: `encode`, `decode`, `vocab_size`, `bos_id`,
`eos_id`, `token_to_id`. Behind it sits a HF `tokenizers.Tokenizer`, whether trained here, read from a
`tokenizer.json`, or converted from a tiktoken `.model` file (lines of `base64(token bytes) rank`, as
Kimi-K2 ships) without the `tiktoken` package.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from openk2.data.chat import K2_CHAT_TEMPLATE, K2_CHAT_TOKENS

PathLike = str | os.PathLike

# K2's chat and tool-call tokens (spec §4). A tokenizer trained here puts them first, so [BOS] = 0 and
# [EOS] = 1 as in the `tiny` and `small` presets.
SPECIAL_TOKENS = (
    "[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
    "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>", "<|tool_call_end|>",
    "<|start_header_id|>", "<|end_header_id|>", "[EOT]", "[UNK]", "[PAD]",
)
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "[BOS]", "[EOS]", "[PAD]"
# Kimi-K2's layout after its mergeable ranks (from its tokenizer_config.json): offset -> token. The
# other offsets up to KIMI_NUM_RESERVED are `<|reserved_token_{id}|>`. Used for a tiktoken file with no
# tokenizer_config.json beside it.
KIMI_SPECIAL_OFFSETS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]",
}
KIMI_NUM_RESERVED = 256
# Kimi-K2's pre-tokenizer regex (`pat_str` of its tokenization_kimi.py): Han runs are their own pieces,
# letters exclude Han, digits in groups of up to 3. HF's Oniguruma supports the `&&` class intersection.
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    (r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
     r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""),
    (r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
     r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""),
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
# Names other tokenizers give BOS / EOS, tried when a tokenizer.json comes without a tokenizer_config.json.
BOS_NAMES = ("[BOS]", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_NAMES = ("[EOS]", "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
# Training text per document beyond this is cut (our choice): it bounds BPE training time on 2 cores
# (a few huge generated files otherwise dominate the pair counts) and changes merges little.
DEFAULT_TRAIN_DOC_CHARS = 32_768


class Tokenizer:
    """What openk2 uses of a tokenizer; `backend` is the HF `tokenizers.Tokenizer` behind it."""

    def __init__(self, backend: tokenizers.Tokenizer, *, eos_token: str, bos_token: str | None = None):
        self.backend = backend
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = self.token_to_id(eos_token)
        self.bos_id = None if bos_token is None else self.token_to_id(bos_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of text, no BOS/EOS added; allow_special=False encodes special-token strings as plain text."""
        return self.encode_batch([text], allow_special=allow_special)[0]

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = True) -> list[list[int]]:
        """`encode` of many texts at once (parallel in the Rust backend)."""
        previous = self.backend.encode_special_tokens
        self.backend.encode_special_tokens = not allow_special
        try:
            return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]
        finally:
            self.backend.encode_special_tokens = previous

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def fingerprint(self) -> str:
        """A short hash of the whole tokenizer, to tell which tokenizer made a set of shards."""
        return hashlib.blake2b(self.backend.to_str().encode(), digest_size=8).hexdigest()

    def save(self, out_dir: PathLike, *, chat_template: str | None = None) -> Path:
        """Write tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer reads.

        chat_template (Jinja) goes into tokenizer_config.json, as Kimi-K2's carries one, so transformers'
        apply_chat_template and vLLM render chats like openk2; by default K2's format when the vocabulary holds
        K2's chat tokens."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.backend.token_to_id(PAD_TOKEN) is not None:
            config["pad_token"] = PAD_TOKEN
        if chat_template is None and all(self.backend.token_to_id(t) is not None for t in K2_CHAT_TOKENS):
            chat_template = K2_CHAT_TEMPLATE
        if chat_template is not None:
            config["chat_template"] = chat_template
        for name, text in (("tokenizer.json", self.backend.to_str(pretty=True)),
                           ("tokenizer_config.json", json.dumps(config, indent=2) + "\n")):
            tmp = out / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, out / name)
        return out


def _byte_level_backend(model: models.Model, pattern: str) -> tokenizers.Tokenizer:
    """A byte-level BPE pipeline: split on `pattern`, map bytes to printable characters, decode back."""
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def train_tokenizer(
    documents: Iterable[str],
    vocab_size: int = 8192,
    out_dir: PathLike | None = None,
    *,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    min_frequency: int = 2,
    max_doc_chars: int | None = DEFAULT_TRAIN_DOC_CHARS,
    pattern: str = KIMI_PATTERN,
    progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE of vocab_size tokens, special tokens first (ids 0, 1, ... in order).

    Each document is cut to its first max_doc_chars for training (None: whole). With fewer distinct
    merges in the corpus the vocabulary comes out smaller than asked. Saved to out_dir when given."""
    special_tokens = list(special_tokens)
    if special_tokens[:2] != [BOS_TOKEN, EOS_TOKEN]:
        raise ValueError(f"special_tokens must start with {BOS_TOKEN}, {EOS_TOKEN}; got {special_tokens[:2]}")
    minimum = len(special_tokens) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small: {len(special_tokens)} special tokens "
                         f"+ 256 bytes need at least {minimum}")
    backend = _byte_level_backend(models.BPE(), pattern)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    texts = (doc if max_doc_chars is None else doc[:max_doc_chars] for doc in documents)
    first = next(texts, None)
    if first is None:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    backend.train_from_iterator(itertools.chain([first], texts), trainer)
    tokenizer = Tokenizer(backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer


# ---------------------------------------------------------------- loading


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the one HF's ByteLevel uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def read_tiktoken_ranks(path: PathLike) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken file: one `base64(token bytes) rank` per line, ranks 0..n-1."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="ascii", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: not a tiktoken line `base64token rank`: {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: {len(missing)} single bytes have no rank (e.g. {missing[0]}); not a byte-level BPE")
    return ranks


def _tiktoken_backend(ranks: dict[bytes, int], pattern: str) -> tokenizers.Tokenizer:
    """An HF BPE that encodes exactly as tiktoken: whole pieces in the vocabulary are one token, else the
    adjacent pair whose concatenation has the lowest rank merges first. Every split (a, b) of every token
    is listed as a merge with that token's rank, which is the same rule."""
    to_char = _bytes_to_unicode()
    vocab = {"".join(to_char[b] for b in token): rank for token, rank in ranks.items()}
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append(("".join(to_char[b] for b in left), "".join(to_char[b] for b in right)))
    return _byte_level_backend(models.BPE(vocab, merges, ignore_merges=True), pattern)


def _load_tiktoken(path: Path, pattern: str) -> tuple[tokenizers.Tokenizer, dict]:
    """Backend and tokenizer_config of a tiktoken file; special tokens from a tokenizer_config.json beside
    it (its `added_tokens_decoder`), else Kimi-K2's layout of KIMI_NUM_RESERVED ids after the ranks."""
    ranks = read_tiktoken_ranks(path)
    backend = _tiktoken_backend(ranks, pattern)
    n = len(ranks)
    config_path = path.parent / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if "added_tokens_decoder" in config:
        names = {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()}
    else:
        names = {n + offset: name for offset, name in KIMI_SPECIAL_OFFSETS.items()}
        config.setdefault("bos_token", BOS_TOKEN)
        config.setdefault("eos_token", EOS_TOKEN)
    if names and min(names) < n:
        raise ValueError(f"{config_path}: special token id {min(names)} collides with the {n} ranks of {path}")
    top = max(n + KIMI_NUM_RESERVED, max(names, default=0) + 1)
    # added tokens take consecutive ids after the ranks, so fill the gaps with reserved names
    backend.add_special_tokens([names.get(i, f"<|reserved_token_{i}|>") for i in range(n, top)])
    for i, name in names.items():
        if backend.token_to_id(name) != i:
            raise ValueError(f"{path}: special token {name!r} should have id {i}, got {backend.token_to_id(name)}")
    return backend, config


def _token_name(value) -> str | None:
    """bos_token / eos_token of a tokenizer_config.json: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(
    path: PathLike,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pattern: str = KIMI_PATTERN,
) -> Tokenizer:
    """Load a tokenizer.json, a tiktoken `.model` file, or a folder holding either (tokenizer.json first).

    BOS/EOS come from the arguments, else tokenizer_config.json beside the file, else well-known names.
    `pattern` is the pre-tokenizer regex of a tiktoken file, which does not store one (default: Kimi-K2's)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    if path.is_dir():
        candidates = [path / "tokenizer.json", path / "tiktoken.model", *sorted(path.glob("*.tiktoken"))]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise FileNotFoundError(f"no tokenizer.json or tiktoken.model in {path}")
        path = found
    if path.suffix == ".json":
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{path}: not a HF tokenizer.json ({e})") from e
        config_path = path.parent / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    else:
        backend, config = _load_tiktoken(path, pattern)
    vocab = backend.get_vocab(with_added_tokens=True)
    bos = bos_token or _token_name(config.get("bos_token")) or next((t for t in BOS_NAMES if t in vocab), None)
    eos = eos_token or _token_name(config.get("eos_token")) or next((t for t in EOS_NAMES if t in vocab), None)
    if eos is None:
        raise ValueError(f"{path}: cannot tell the EOS token; pass eos_token=")
    for name in (bos, eos):
        if name is not None and name not in vocab:
            raise ValueError(f"{path}: token {name!r} is not in the vocabulary")
    return Tokenizer(backend, bos_token=bos, eos_token=eos)
