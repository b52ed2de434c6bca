"""Data parallelism from outside the model (house rule 2): FSDP2 under `torchrun`, a no-op otherwise.

`torchrun --nproc_per_node N -m openk2 pretrain CONFIG` gives each rank a slice of every global
batch; parameters are sharded with `fully_shard` (one unit per decoder layer plus the root), and
checkpoints gather full tensors: the model in the hub layout, the optimizer in the single-process
layout, so that a run resumes under any number of ranks. Muon and QK-Clip handle the sharded
parameters themselves (`openk2.optim.sharded`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from openk2.optim.sharded import is_dtensor, shard_like


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we destroy it (close)

    @classmethod
    def from_env(cls) -> Distributed:
        """Read torchrun's environment; initialise the process group when there is more than one rank."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        owns_group = not torch_dist.is_initialized()
        if owns_group:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch_dist.init_process_group(backend)
        return cls(rank=rank, world_size=world, local_rank=local_rank, owns_group=owns_group)

    def close(self) -> None:
        """Destroy the process group this object initialised (a caller's own group is left alone).

        Left to interpreter shutdown, gloo's worker threads can still hold work objects with tensors whose
        release takes the GIL while the interpreter is torn down: SIGABRT after training has finished
        (pytorch/pytorch PR 179291 describes it). torchtitan also destroys its group explicitly.
        """
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
            self.owns_group = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device(self, name: str = "auto") -> torch.device:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (B must divide by the world size)."""
        if not self.enabled:
            return batch
        if batch.shape[0] % self.world_size:
            raise ValueError(f"global batch of {batch.shape[0]} sequences does not split over {self.world_size} ranks")
        n = batch.shape[0] // self.world_size
        return batch[self.rank * n:(self.rank + 1) * n]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            torch_dist.all_reduce(value, op=torch_dist.ReduceOp.AVG if value.is_cuda else torch_dist.ReduceOp.SUM)
            if not value.is_cuda:  # gloo has no AVG
                value /= self.world_size
        return value

    # ------------------------------------------------------------------------- FSDP2
    def parallelize(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)  # keeps the module class: its methods (update_expert_bias, ...) stay callable
        return model

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Full (unsharded) CPU state dict on rank 0 when sharded; None means "use the module as is"."""
        if not self.enabled:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """`optimizer.state_dict()` with sharded tensors gathered full onto rank 0's CPU (every rank must call it).

        The layout is the single-process one, so a checkpoint resumes under any number of ranks.
        """
        state = optimizer.state_dict()
        if not self.enabled:
            return state
        # one all-gather per sharded tensor, in the same order on every rank
        return {**state, "state": {i: {k: self._gathered(v) for k, v in values.items()}
                                   for i, values in state["state"].items()}}

    def _gathered(self, value):
        if not is_dtensor(value):
            return value
        value = value.full_tensor()  # all-gather; only rank 0 writes the checkpoint
        return value.cpu() if self.is_main else None

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a full (single-process layout) optimizer state; each rank keeps its shard of sharded parameters."""
        if self.enabled:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if any(i >= len(params) for i in state["state"]):
                raise ValueError(f"optimizer state has entries up to #{max(state['state'])}, but the optimizer "
                                 f"holds {len(params)} parameters")
            state = {**state, "state": {i: {k: _shard(v, params[i]) for k, v in values.items()}
                                        for i, values in state["state"].items()}}
        optimizer.load_state_dict(state)


def _shard(value, param: torch.Tensor):
    """This rank's shard of `value` when it is a full tensor shaped like DTensor `param` (momenta, moments)."""
    if is_dtensor(param) and torch.is_tensor(value) and value.shape == param.shape:
        return shard_like(value.to(param.device), param)
    return value
