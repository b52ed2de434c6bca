"""Linear layers whose weights are prepacked for oneDNN: the CPU decode path of served transformers models.

A decode step multiplies a few rows by every weight of the model, and at SmolLM2's 540 MB (fp32) those weights
come from DRAM each step: the step is bound by how fast the matmul streams them. MKL's sgemm behind `F.linear`
streams a plain row-major weight at ~10 GB/s on our 2-core CPU; oneDNN reading a weight reordered once into its
blocked layout streams ~25 GB/s (benchmarks/RESULTS.md, "Serving"). This is the same reorder that inductor's
freezing pass applies; here it is done without compiling. The packed copy is extra memory, so `pack_linears`
packs only when it fits comfortably in what the machine has free.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

BATCH_HINT = 64  # the reorder's row-count hint: packed for 64 rows ran 1, 16 and 64 rows fastest (2.2x, 2.2x, 1.6x)


def packing_available(weight: torch.Tensor) -> bool:
    """oneDNN prepacking helps fp32 weights on a CPU with oneDNN (x86 builds of torch have it)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def free_memory_bytes() -> int | None:
    """Memory a new allocation can get: Linux's MemAvailable (page cache counts, it can be dropped), else the free
    pages, else None (unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return None


class PackedLinear:
    """y = x Wᵀ + b with W reordered for oneDNN once; x (N, in) -> (N, out). Inference only: no autograd."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_HINT)
        self.bias = None if bias is None else bias.detach().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + self(x), the add fused into the matmul's output (oneDNN's binary post-op)."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")


def pack_linears(weights: list[tuple[torch.Tensor, torch.Tensor | None]],
                 max_share_of_free: float = 0.5) -> list[PackedLinear] | None:
    """A PackedLinear per (weight, bias), or None when packing is unavailable or the copies would take more than
    `max_share_of_free` of the free memory (then the caller keeps its plain path)."""
    if not weights or not all(packing_available(w) for w, _ in weights):
        return None
    need = sum(w.numel() * w.element_size() for w, _ in weights)
    free = free_memory_bytes()
    if free is not None and need > max_share_of_free * free:
        log.info("not prepacking %.0f MB of weights for oneDNN: %.0f MB free", need / 2**20, free / 2**20)
        return None
    try:
        return [PackedLinear(w, b) for w, b in weights]
    except RuntimeError as e:  # a oneDNN build without this reorder for this CPU: the plain path still works
        log.warning("not prepacking weights for oneDNN: %s", e)
        return None

