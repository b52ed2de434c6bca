"""Training tokens/s of openk2's K2ForCausalLM vs transformers' DeepseekV3ForCausalLM on the same config.

forward + backward + AdamW step, fp32, the same weights (loaded from one hub-layout checkpoint) and
the same batches; the two models alternate step by step so that machine noise hits both alike.
Prints the ratio. Usage: python benchmarks/train_throughput.py [--preset tiny] [--steps 20] [--device cuda]
[--compile openk2|both] (torch.compile openk2's model, as `train.compile = true` does, or both models; the warmup
steps take the compile)
"""

import argparse
import tempfile
import time

import torch

from openk2 import K2ForCausalLM, preset
from openk2.device import tune_cpu_allocator


def train_step(model, optim, ids) -> None:
    model(ids, labels=ids).loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    if ids.is_cuda:  # a step is over when the GPU is done with it, not when its kernels are queued
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-tune-allocator", action="store_true", help="keep glibc's malloc defaults")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (still fp32, as the issue asks)")
    ap.add_argument("--compile", choices=["none", "openk2", "both"], default="none",
                    help="torch.compile openk2's model (as train.compile does) or both models")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then profile N more steps of each model and print its top ops (torch.profiler)")
    args = ap.parse_args()
    device = torch.device(args.device)

    from transformers import DeepseekV3ForCausalLM

    if not args.no_tune_allocator:
        tune_cpu_allocator()  # process-wide: both models get it, as a user of either would
    torch.manual_seed(0)
    config = preset(args.preset)
    ours = K2ForCausalLM(config).train()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).train()
    ours.to(device)
    models = {"openk2": ours, "transformers": theirs}
    for name in {"none": [], "openk2": ["openk2"], "both": list(models)}[args.compile]:
        models[name].compile()
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    times = {k: [] for k in models}
    warmup_seconds = {k: 0.0 for k in models}
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq)).to(device)
        for name, model in models.items():
            start = time.perf_counter()
            train_step(model, optims[name], ids)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
            else:
                warmup_seconds[name] += time.perf_counter() - start
    tokens = args.batch * args.seq
    tps = {k: tokens * len(v) / sum(v) for k, v in times.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu threads={torch.get_num_threads()}"
    print(f"preset={args.preset} batch={args.batch}x{args.seq} steps={args.steps} {where} "
          f"allocator_tuned={not args.no_tune_allocator} compile={args.compile}")
    if args.compile != "none":
        print("warmup steps (compile included): " + ", ".join(f"{k} {v:.1f} s" for k, v in warmup_seconds.items()))
    for k, v in tps.items():
        print(f"{k:>13}: {v:9.0f} tokens/s  ({1000 * tokens / v:5.0f} ms/step)")
    print(f"ratio openk2/transformers: {tps['openk2'] / tps['transformers']:.2f}x")
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq)).to(device)
        for name, model in models.items():
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(args.profile):
                    train_step(model, optims[name], ids)
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\n{name}: {args.profile} steps, top ops by {key}")
            print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=50))
            print(f"{name}: {kernel_ops(prof) / args.profile:.0f} kernel-launching aten ops per step")


# aten ops that launch no kernel: views, metadata, allocation, host reads
NO_KERNEL = {
    "as_strided", "view", "resolve_conj", "resolve_neg", "_unsafe_view", "detach", "detach_", "result_type",
    "_reshape_alias", "empty", "empty_strided", "empty_like", "t", "transpose", "expand", "slice", "select", "split",
    "split_with_sizes", "unbind", "reshape", "squeeze", "unsqueeze", "permute", "alias", "lift_fresh", "chunk",
    "narrow", "contiguous", "numpy_T", "_local_scalar_dense", "item", "is_nonzero", "scalar_tensor", "unflatten",
    "flatten", "broadcast_tensors",
}


def kernel_ops(prof) -> int:
    """Aten ops in a trace that would launch a kernel on a GPU: the innermost ops not in NO_KERNEL (a proxy for a
    launch-bound step's cost, countable on a CPU)."""
    def launches(e) -> bool:
        return e.name.startswith("aten::") and e.name[6:] not in NO_KERNEL

    def has_launching_child(e) -> bool:
        return any(launches(c) or has_launching_child(c) for c in e.cpu_children)

    return sum(launches(e) and not has_launching_child(e) for e in prof.events())


if __name__ == "__main__":
    main()
