"""How the optimizers meet FSDP2-sharded parameters (house rule 2: parallelism is applied from outside).

`fully_shard` turns each parameter into a DTensor whose ranks hold contiguous blocks of rows
(placement Shard(0)). Muon orthogonalises whole matrices and QK-Clip rescales whole rows, so
they ask here whether a tensor is sharded, and take their rank's part of a full tensor.
"""

from __future__ import annotations

import sys

from torch import Tensor


def is_dtensor(t: Tensor) -> bool:
    """True for a DTensor; a process that never imported torch.distributed.tensor holds none (and pays no import)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """`full` (of DTensor `like`'s global shape) as a DTensor split as `like` is: each rank slices, no communication."""
    from torch.distributed.tensor import distribute_tensor

    if full.shape != like.shape:
        raise ValueError(f"a full tensor of shape {tuple(full.shape)} cannot be split like one of {tuple(like.shape)}")
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def local_part(full: Tensor, like: Tensor) -> Tensor:
    """This rank's part of `full`, as a plain tensor (see `shard_like`)."""
    return shard_like(full, like).to_local()


def holds_whole_matrices(p: Tensor) -> bool:
    """True when DTensor `p` (..., A, B) is split along its leading dims only (a stack of experts sharded
    by expert), so that each rank holds whole matrices and can orthogonalise them alone."""
    from torch.distributed.tensor import Replicate, Shard

    return all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim % p.ndim < p.ndim - 2)
               for pl in p.placements)
