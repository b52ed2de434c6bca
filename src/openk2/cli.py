"""`openk2 <verb>`: the command line. Each verb is a thin wrapper over the package's public functions."""

from __future__ import annotations

import argparse
import sys
import time


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


def _data_prepare(args: argparse.Namespace) -> int:
    from openk2.data import prepare_default_corpus

    manifest = prepare_default_corpus(args.out, force=args.force)
    print(f"default corpus in {args.out}: {manifest['documents']} documents, {manifest['bytes'] / 1e6:.1f} MB "
          f"from {', '.join(manifest['sources'])}")
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from openk2.data import iter_documents, prepare_default_corpus, train_tokenizer

    paths = args.corpus
    if not paths:
        prepare_default_corpus(args.default_corpus)
        paths = [args.default_corpus]
    tokenizer = train_tokenizer(iter_documents(paths), args.vocab_size, args.out)
    print(f"tokenizer with {tokenizer.vocab_size} tokens written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openk2", description="The Kimi K2 recipe as software.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("pretrain", help="pretrain a model (paper §2); no CONFIG = the tiny default demo")
    p.add_argument("config", nargs="?", help="TOML config (defaults: openk2.train.config.PretrainConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder from its latest checkpoint")
    p.set_defaults(func=_pretrain)

    p = verbs.add_parser("data", help="corpora")
    data_verbs = p.add_subparsers(dest="data_verb", required=True)
    p = data_verbs.add_parser("prepare", help="build the default corpus offline (stdlib + Python/Linux docs)")
    p.add_argument("--out", default="data/corpus")
    p.add_argument("--force", action="store_true", help="rebuild even when present")
    p.set_defaults(func=_data_prepare)

    p = verbs.add_parser("tokenizer", help="tokenizers")
    tok_verbs = p.add_subparsers(dest="tokenizer_verb", required=True)
    p = tok_verbs.add_parser("train", help="train a byte-level BPE with K2's special tokens")
    p.add_argument("corpus", nargs="*", help="files or folders (.txt .md .jsonl .parquet); none = default corpus")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", required=True)
    p.add_argument("--default-corpus", default="data/corpus", help=argparse.SUPPRESS)
    p.set_defaults(func=_tokenizer_train)

    p = verbs.add_parser("plot", help="(re)draw a run folder's plots")
    p.add_argument("run_dir")
    p.set_defaults(func=_plot)

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
    if run_dir and "{time}" not in run_dir:
        from pathlib import Path

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(run_dir) / "error.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n{type(error).__name__}: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
