"""`openk2 <verb>`: the command line. Each verb is a thin wrapper over the package's public functions."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    """A few training steps of a preset on random tokens, printing the loss (the foundation smoke run)."""
    import torch
    from tqdm import tqdm

    from openk2 import K2ForCausalLM, preset
    from openk2.device import default_device, tune_cpu_allocator

    tune_cpu_allocator()
    torch.manual_seed(args.seed)
    device = default_device()
    config = preset(args.preset)
    model = K2ForCausalLM(config).to(device).train()
    print(f"openk2 demo: preset {args.preset!r}, {config.num_parameters() / 1e6:.1f}M parameters "
          f"({config.num_parameters(active=True) / 1e6:.1f}M active per token), device {device}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    # a fixed pool of random sequences: the loss falls as the model memorises it
    data = torch.randint(0, config.vocab_size, (args.batch * 4, args.seq_len), device=device)
    start, first = time.perf_counter(), None
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        batch = data[(step % 4) * args.batch:(step % 4 + 1) * args.batch]
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance = model.update_expert_bias(gamma=1e-3)
        first = loss.item() if first is None else first
        bar.set_postfix(loss=f"{loss.item():.3f}", load_max_mean=f"{balance['load_max_over_mean_avg']:.2f}")
    elapsed = time.perf_counter() - start
    tokens = args.steps * args.batch * args.seq_len
    print(f"loss {first:.3f} -> {loss.item():.3f} over {args.steps} steps; "
          f"{tokens / elapsed:.0f} tokens/s on random tokens")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openk2", description="The Kimi K2 recipe as software.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    demo = verbs.add_parser("demo", help="train a preset a few steps on random tokens and print the loss")
    demo.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--seq-len", type=int, default=128)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
