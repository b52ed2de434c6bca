"""Checkpoints in the hub layout (spec §1): `config.json` + safetensors, sharded with an index above a size.

Our parameter names are the hub keys except for the stacked routed experts, which the hub (and
transformers' loader) store one matrix per expert: `mlp.experts.gate_proj` (E, I, H) here is
`mlp.experts.{j}.gate_proj.weight` there. That split is the only renaming in this file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openk2.model.config import ModelConfig
from openk2.model.model import K2ForCausalLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_HUB_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# transformers >= 5 keeps experts fused in memory and writes them fused when it cannot map them back
# (e.g. for model_type "kimi_k2"): gate_up_proj (E, 2I, H) = [gate | up] along dim 1.
_FUSED_GATE_UP = re.compile(r"^(.*\.mlp\.experts)\.gate_up_proj$")


def hub_tensors(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(hub key, tensor) for every weight of a model state dict, in order; experts split per expert."""
    for name, tensor in state.items():
        m = _EXPERTS.match(name)
        if m is None:
            yield name, tensor
            continue
        prefix, proj = m.groups()
        for j in range(tensor.shape[0]):
            yield f"{prefix}.{j}.{proj}.weight", tensor[j]


def hub_shapes(model: K2ForCausalLM) -> dict[str, tuple[int, ...]]:
    """Expected hub key -> shape (works on a meta-device model)."""
    return {k: tuple(t.shape) for k, t in hub_tensors(model.state_dict())}


def save_pretrained(model: K2ForCausalLM, path: str | os.PathLike,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    save_state(model.config, model.state_dict(), path, max_shard_bytes)


def save_state(config: ModelConfig, state: dict[str, torch.Tensor], path: str | os.PathLike,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write a model state dict in the hub layout, atomically: everything goes to a sibling temp
    folder that replaces `path` at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        shards: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = 0
        for key, t in hub_tensors(state):
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, t))
            size += nbytes
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = WEIGHTS_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            # clone: safetensors refuses views that share storage (the per-expert slices)
            save_file({k: t.detach().to("cpu").contiguous().clone() for k, t in shard}, tmp / name,
                      metadata={"format": "pt"})
            for k, t in shard:
                weight_map[k] = name
                total += t.numel() * t.element_size()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        hf_config = config.to_hf(complete=True)
        hf_config["torch_dtype"] = str(next(t for k, t in state.items() if k.endswith("embed_tokens.weight")).dtype
                                       ).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dst: Path) -> None:
    """Swap `src` in for `dst`; other files a user keeps in `dst` (tokenizer, README) are carried over."""
    if dst.exists():
        for item in dst.iterdir():
            if item.name == "config.json" or item.name == INDEX_NAME or item.suffix == ".safetensors":
                continue
            if not (src / item.name).exists():
                os.replace(item, src / item.name)
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in dict.fromkeys(weight_map.values())]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    return files


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> K2ForCausalLM:
    """Build the model from `config.json` and fill it from the safetensors files, checking every key and shape.

    Reads the hub layout (one matrix per expert) and transformers' fused expert tensors alike.
    Missing, unexpected or misshaped tensors raise a ValueError that names them. MTP layers
    (index ≥ num_hidden_layers, present in DeepSeek-V3's checkpoint) are skipped, as transformers does.
    """
    path = Path(path)
    config = ModelConfig.from_hf(path)
    dtype = dtype or torch.float32
    device = torch.device(device)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    ours = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    filled: dict[str, set[int]] = {}  # stacked expert tensor -> experts read so far
    unexpected: list[str] = []

    def put(name: str, t: torch.Tensor, key: str, file: Path, expert: int | None = None) -> None:
        want = ours[name].shape if expert is None else ours[name].shape[1:]
        if t.shape != want:
            raise ValueError(f"tensor {key!r} in {file.name} has shape {tuple(t.shape)}, expected {tuple(want)}")
        # the router stays fp32 whatever the model dtype (spec §1), as transformers keeps it
        keep_fp32 = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        t = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
        if expert is None:
            state[name] = t
            filled[name] = set(range(t.shape[0]))
            return
        if name not in state:
            state[name] = torch.empty(ours[name].shape, dtype=dtype, device=device)
        state[name][expert].copy_(t)
        filled.setdefault(name, set()).add(expert)

    for file in _weight_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                layer = _LAYER.match(key)
                if layer and int(layer.group(1)) >= config.num_hidden_layers:
                    continue  # MTP module
                expert = _HUB_EXPERT.match(key)
                fused = _FUSED_GATE_UP.match(key)
                if key in ours:
                    put(key, f.get_tensor(key), key, file)
                elif expert and f"{expert[1]}.{expert[3]}" in ours:
                    put(f"{expert[1]}.{expert[3]}", f.get_tensor(key), key, file, expert=int(expert[2]))
                elif fused and f"{fused[1]}.gate_proj" in ours:
                    t = f.get_tensor(key)
                    gate = ours[f"{fused[1]}.gate_proj"]
                    if t.shape != (gate.shape[0], 2 * gate.shape[1], gate.shape[2]):
                        raise ValueError(f"tensor {key!r} in {file.name} has shape {tuple(t.shape)}, "
                                         f"expected {(gate.shape[0], 2 * gate.shape[1], gate.shape[2])}")
                    g, u = t.chunk(2, dim=1)
                    put(f"{fused[1]}.gate_proj", g.contiguous(), key, file)
                    put(f"{fused[1]}.up_proj", u.contiguous(), key, file)
                else:
                    unexpected.append(key)
    if unexpected:
        raise ValueError(f"{len(unexpected)} unexpected tensors in {path}, e.g. {unexpected[:5]}")
    missing = [k for k in hub_shapes(model) if not _is_filled(k, filled)]
    if missing:
        raise ValueError(f"{len(missing)} tensors missing from {path}, e.g. {missing[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():  # non-persistent buffers are not in the files
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                zeros = torch.zeros(buf.shape, dtype=torch.float32, device=device)
                module.register_buffer(name, zeros, persistent=False)
    return model


def _is_filled(hub_key: str, filled: dict[str, set[int]]) -> bool:
    m = _HUB_EXPERT.match(hub_key)
    if m is None:
        return hub_key in filled
    return int(m[2]) in filled.get(f"{m[1]}.{m[3]}", ())
