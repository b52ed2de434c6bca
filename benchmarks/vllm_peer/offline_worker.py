"""Runs inside vLLM's venv: greedy tokens for token-id prompts, as JSON on stdout (the `__main__` guard vLLM needs)."""

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir, prompts_file, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompts = json.load(open(prompts_file))
    # plain RoPE: vLLM's CPU rotary op rotates MLA's strided q wrongly, so use its native (PyTorch) rotary
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
              compilation_config={"custom_ops": ["-rotary_embedding"]}, max_model_len=1024)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
