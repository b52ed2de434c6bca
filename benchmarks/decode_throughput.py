"""Decode tokens/s of openk2's Engine vs transformers' `generate` on the same K2 model (issue 5).

Same weights (transformers loads the checkpoint openk2 writes), same prompts, greedy, fp32, no stop
tokens, `--new` tokens per sequence; batch 1 and batch 16. Timed per call: prefill + all decode steps,
tokens/s = batch × new tokens / seconds; on a CPU the eager engine also runs without its oneDNN-packed
matrices ("openk2 unpacked"), on a GPU as CUDA graphs. Engines and
transformers alternate round by round so that machine noise hits them alike; the median round counts.
The compile or capture time (the first generate) is printed apart.
Usage: python benchmarks/decode_throughput.py [--preset tiny | --config c.json] [--device cuda]
"""

import argparse
import statistics
import tempfile
import time

import torch

from openk2 import K2ForCausalLM, ModelConfig, preset
from openk2.device import tune_cpu_allocator
from openk2.serve import Engine, SamplingParams


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_initialized():  # done means the GPU is done
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--config", help="a hub config.json (overrides --preset)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled engine")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (still fp32)")
    args = ap.parse_args()
    device = torch.device(args.device)

    from transformers import DeepseekV3ForCausalLM

    tune_cpu_allocator()  # process-wide: every contender gets it
    torch.manual_seed(0)
    config = ModelConfig.from_hf(args.config) if args.config else preset(args.preset)
    model = K2ForCausalLM(config).to(device).eval()
    batches = [int(b) for b in args.batches.split(",")]
    max_seq = args.prompt + args.new
    params = SamplingParams(max_new_tokens=args.new, stop_token_ids=())
    contenders = {"openk2": Engine(model, max_batch=max(batches), max_seq_len=max_seq)}
    if device.type == "cpu":  # what prepacking the largest matrices for oneDNN gains
        contenders["openk2 unpacked"] = Engine(model, max_batch=max(batches), max_seq_len=max_seq, pack=False)
    if not args.no_compile:
        contenders["openk2 compiled"] = Engine(model, max_batch=max(batches), max_seq_len=max_seq, compile=True)
    if device.type == "cuda":  # eager kernels replayed as CUDA graphs: one launch per step
        contenders["openk2 cuda graphs"] = Engine(model, max_batch=max(batches), max_seq_len=max_seq, cuda_graphs=True)
    if not args.no_transformers:
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()
        hf.generation_config.eos_token_id = None  # no stop tokens, as for openk2
        hf.generation_config.pad_token_id = 0
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu threads={torch.get_num_threads()}"
    print(f"config={args.config or args.preset} params={config.num_parameters() / 1e6:.1f}M prompt={args.prompt} "
          f"new={args.new} greedy fp32 {where} rounds={args.rounds} (median)")

    for B in batches:
        g = torch.Generator().manual_seed(B)
        ids = torch.randint(2, config.vocab_size, (B, args.prompt), generator=g)
        prompts = ids.tolist()
        ids = ids.to(device)
        runs = {name: (lambda e=e: e.generate(prompts, params)) for name, e in contenders.items()}
        if not args.no_transformers:
            def hf_generate():
                with torch.no_grad():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                      min_new_tokens=args.new, do_sample=False)
                assert out.shape == (B, args.prompt + args.new)
            runs["transformers"] = hf_generate
        for name, fn in runs.items():  # warm-up; the compiled engine compiles here
            seconds = timed(fn)
            if name in ("openk2 compiled", "openk2 cuda graphs"):
                print(f"  batch {B:>2}: {name}: compile or capture + first generate {seconds:.1f} s")
        if not args.no_transformers:  # the same greedy tokens, or the comparison means nothing
            ours = torch.tensor([o.token_ids for o in contenders["openk2"].generate(prompts, params)])
            with torch.no_grad():
                theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                     min_new_tokens=args.new, do_sample=False)[:, args.prompt:]
            agree = (ours == theirs.cpu()).float().mean().item()
            print(f"  batch {B:>2}: greedy tokens equal to transformers' {100 * agree:.1f}%")
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn))
        tps = {name: B * args.new / statistics.median(t) for name, t in times.items()}
        for name, v in tps.items():
            ratio = f"  ({v / tps['transformers']:5.1f}x transformers)" if "transformers" in tps else ""
            print(f"  batch {B:>2}: {name:>16} {v:9.0f} tok/s  {1000 * B / v:6.2f} ms/step{ratio}")


if __name__ == "__main__":
    main()
