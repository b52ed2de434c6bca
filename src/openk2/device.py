"""Where and in what precision to run: fp32 on CPU (bf16 matmul is ~60x slower there), bf16 autocast on GPU."""

from __future__ import annotations

import ctypes
import platform

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training on `device`, or None for plain fp32."""
    return torch.bfloat16 if device.type == "cuda" else None


def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every step.

    Why: a training step allocates and frees the same large activations each time; with glibc's
    defaults each one is a fresh mmap whose pages fault in on first touch, which costs as much as
    the arithmetic at small model sizes. Returns whether the setting was applied (glibc only).
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter ids from <malloc.h>
    ok = libc.mallopt(m_mmap_max, 0) == 1  # serve large blocks from the heap too ...
    ok &= libc.mallopt(m_trim_threshold, 1 << 40) == 1  # ... and never trim it back
    return bool(ok)
