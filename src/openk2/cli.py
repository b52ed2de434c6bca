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


def _pretrain(args: argparse.Namespace) -> int:
    from openk2.train.pretrain import load_pretrain_config, pretrain, resume_config

    cfg = resume_config(args.resume, args.set) if args.resume else load_pretrain_config(args.config, args.set)
    summary = pretrain(cfg, resume=args.resume)
    if summary.get("stopped"):
        return 130
    if summary.get("plots") is not None:
        val = f"{summary['val_loss']:.4f}" if summary.get("val_loss") is not None else "n/a"
        logit = f"{summary['max_logit']:.1f}" if summary.get("max_logit") is not None else "n/a"
        print(f"done: {summary['step']} steps, {summary['tokens_seen']:,} tokens seen, val loss {val}, "
              f"max attention logit {logit}")
        print(f"run folder: {summary['run_dir']}  (plots: {summary['run_dir']}/plots/)")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from openk2.train.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openk2", description="The Kimi K2 recipe as software.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("pretrain", help="pretrain a model (paper §2); no CONFIG = the tiny default demo")
    p.add_argument("config", nargs="?", help="TOML config (defaults: openk2.train.config.PretrainConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder from its latest checkpoint")
    p.set_defaults(func=_pretrain)

    p = verbs.add_parser("plot", help="(re)draw a run folder's plots")
    p.add_argument("run_dir")
    p.set_defaults(func=_plot)

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
    from openk2.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # bad input: one clear line (and the run folder's error log when one is named), no traceback
        print(f"openk2 {args.verb}: error: {e}", file=sys.stderr)
        _log_error(args, e)
        return 2


def _log_error(args: argparse.Namespace, error: Exception) -> None:
    run_dir = getattr(args, "resume", None)
    if run_dir is None and getattr(args, "verb", None) == "pretrain":
        try:
            from openk2.train.pretrain import load_pretrain_config

            run_dir = load_pretrain_config(args.config, args.set).run_dir
        except Exception:  # the config itself is what is broken
            return
    if run_dir:
        from pathlib import Path

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(run_dir) / "error.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n{type(error).__name__}: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
