"""Muon and QK-Clip on FSDP2-sharded (DTensor) parameters equal their single-process selves; 2 gloo ranks."""

import copy

import pytest
import torch
from torch import nn

from openk2 import preset
from openk2.model.model import MultiHeadLatentAttention
from openk2.optim import Muon
from openk2.optim.qk_clip import GQAClipTarget, MLAClipTarget
from tests.optim.test_qk_clip import GQAAttention
from tests.ranks import run_on_ranks

# uneven shards on 2 ranks: 7 rows split 4 | 3, 3 experts split 2 | 1
SHAPES = {"matrix": ((7, 5), 0), "wide": ((5, 9), 0), "experts": ((3, 6, 4), 0), "experts_by_row": ((2, 7, 4), 1)}


def _sharded_muon(mesh) -> list[str]:
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    failures = []
    for name, (shape, dim) in SHAPES.items():
        w0, grads = torch.randn(shape) * 0.02, [torch.randn(shape) for _ in range(3)]
        full, shard = nn.Parameter(w0.clone()), nn.Parameter(distribute_tensor(w0, mesh, [Shard(dim)]))
        for p in (full, shard):
            opt = Muon([p], lr=0.02, weight_decay=0.1)
            for g in grads:
                p.grad = distribute_tensor(g, mesh, [Shard(dim)]) if p is shard else g.clone()
                opt.step()
        if not torch.allclose(shard.detach().full_tensor(), full.detach(), rtol=1e-6, atol=1e-8):
            failures.append(f"muon {name}")
    return failures


def _sharded_clip(mesh) -> list[str]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    failures = []
    # 3 heads of 3 rows: q's 9 rows split 5 | 4 and k's 3 rows 2 | 1, both mid-head
    gqa = GQAAttention(hidden=8, num_heads=3, num_key_value_heads=1, head_dim=3, bias=True)
    mla = MultiHeadLatentAttention(preset("tiny").replace(num_attention_heads=3, q_lora_rank=16, kv_lora_rank=8,
                                                          qk_nope_head_dim=5, qk_rope_head_dim=2, v_head_dim=3,
                                                          hidden_size=16))
    for name, module, target, gamma in (
        ("gqa", gqa, lambda m: GQAClipTarget("gqa", m, 3, 1, 3), torch.tensor([0.25, 0.25, 0.25])),
        ("mla", mla, lambda m: MLAClipTarget("mla", m), torch.tensor([0.25, 1.0, 0.5])),
    ):
        sharded = fully_shard(copy.deepcopy(module), mesh=mesh)
        with torch.no_grad():  # as in QKClip.apply
            target(module).scale_(gamma)
            target(sharded).scale_(gamma)
        for key, value in module.state_dict().items():
            if not torch.equal(sharded.state_dict()[key].full_tensor(), value):
                failures.append(f"qk-clip {name} {key}")
    return failures


def _worker(rank, world) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    return _sharded_muon(mesh) + _sharded_clip(mesh)


@pytest.mark.slow
def test_muon_and_qk_clip_on_dtensors_equal_single_process(tmp_path):
    assert run_on_ranks(_worker, tmp_path) == [[], []]
