#!/usr/bin/env bash
# The routing evidence in bench/README.md ("Which routing fits the task"): on the demo model, two tasks
# (assets/demo: addition it never saw; assets/subtraction: subtraction it half knows) x 3 seeds x 6
# candidates at matched trainable parameters (49,152 = 2.6 % of the model), 80 steps each.
# About 20 minutes on 2 CPU cores; one thread per training is faster than two on a busy machine.
# A rerun skips the candidates that finished (delete runs/evidence-* to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
CANDIDATES=(
  --candidate "attention-lora: routing.strategy=none routing.attention_lora=true adapter.placement=parallel"
  --candidate "shared: routing.strategy=shared adapter.placement=parallel"
  --candidate "dense: routing.strategy=dense adapter.placement=parallel"
  --candidate "routed: routing.strategy=routed adapter.placement=parallel"
  --candidate "embedded-parallel: routing.strategy=embedded adapter.placement=parallel"
  --candidate "embedded-inside: routing.strategy=embedded adapter.placement=inside"
)
COMMON=(--params 49152 --max-steps 80 --seeds 0,1,2 --set train.save_every=1000 "${CANDIDATES[@]}")
.venv/bin/moetune sweep presets/demo.yaml "${COMMON[@]}" --out runs/evidence-demo
.venv/bin/moetune sweep presets/demo.yaml "${COMMON[@]}" --out runs/evidence-subtraction \
  --set data.train=assets/subtraction/train.jsonl --set data.eval=assets/subtraction/eval.json \
  --set "eval.benchmarks=[assets/subtraction/eval.json]"
