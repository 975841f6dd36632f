#!/usr/bin/env bash
# The routing evidence in bench/README.md ("Which routing fits the task"): on the routing testbed
# (assets/testbed, scripts/make_testbed.py: 16 experts, top-2, a router that separates four fact domains),
#   facts     every domain's facts changed by its own rule, scored on held-out entities (bench/testbed.yaml);
#   addition  assets/demo's "What is a + b?", never seen in pretraining: the attention-bound control.
# Each sweep picks every candidate's lr on held-out loss (--lr-grid, seed 0), then runs seeds 0, 1, 2 at it.
#   facts-trainable-kaiming    all candidates at 35,000 trainable parameters (matched within 10 %)
#   facts-trainable-perft      the MoE-side candidates again with the paper's init and its own lr grid
#   facts-activated-kaiming    routed / embedded at 35,000 activated adapter parameters per token
#                              (shared, dense and attention LoRA activate all they have: the rows above)
#   addition-demo-kaiming      the attention-bound control, "What is a + b?" (assets/demo), on the demo model: the
#                              testbed learnt too little arithmetic in its 1,500 steps (attention LoRA, its best lr:
#                              5 % after 100 steps), the demo model knows equations; attention LoRA, shared,
#                              embedded (parallel, inside) at 49,152 trainable, as the demo's earlier table
# kaiming (PEFT's default) and perft (the paper's init) get their own lr grid: perft's A is 5-20x larger.
# `dense` under kaiming is `shared` (a sum of N kaiming-initialised LoRAs is one LoRA of rank N*r, the same
# numbers in the same order), and attention LoRA keeps PEFT's init under perft too: neither is run twice.
# Not run, for CPU time (2 shared cores): dense under perft, the activated match under perft, routed on the
# control. Three sweeps at a time (one thread each); 80 trainings of 80-100 steps, about 50 minutes on 2 busy
# cores. A rerun skips finished runs (delete runs/evidence-* to start over).
# At the end it prints the Markdown table of bench/README.md (scripts/evidence_table.py).
# `scripts/sweep_evidence.sh combined` runs only the follow-up: attention LoRA with each strategy beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
MOETUNE="${MOETUNE:-.venv/bin/moetune}"
PARAMS=35000
ATT="attention-lora: routing.strategy=none routing.attention_lora=true adapter.placement=parallel"
SHARED="shared: routing.strategy=shared adapter.placement=parallel"
ROUTED="routed: routing.strategy=routed adapter.placement=parallel"
EMB="embedded-parallel: routing.strategy=embedded adapter.placement=parallel"
INSIDE="embedded-inside: routing.strategy=embedded adapter.placement=inside"
KAIMING=(--set adapter.init=kaiming --lr-grid 3e-3,1e-2,3e-2)
PERFT=(--set adapter.init=perft --lr-grid 3e-4,1e-3,3e-3)
ADDITION=(--set model.path=assets/demo/model --set data.train=assets/demo/train.jsonl
          --set data.eval=assets/demo/eval.json --set "eval.benchmarks=[assets/demo/eval.json]" --set data.max_len=128
          --set train.max_steps=80)

sweep() {  # NAME ARGS...: one sweep into runs/evidence-NAME, its output in runs/evidence-NAME.log
  local name=$1; shift
  mkdir -p runs
  "$MOETUNE" sweep bench/testbed.yaml --seeds 0,1,2 "$@" --out "runs/evidence-$name" \
    > "runs/evidence-$name.log" 2>&1 && echo "done: $name" || echo "FAILED: $name (runs/evidence-$name.log)"
}

if [[ "${1:-all}" == "combined" ]]; then
  # attention LoRA with each MoE-side strategy beside it, against attention LoRA alone, at 35,000 trainable
  # parameters (one rank for both parts, matched by the sweep), kaiming, each at its own lr: does routing add
  # anything once attention carries the task? Two sweeps at a time, about 35 minutes on 2 busy cores.
  sweep facts-combined-a "${KAIMING[@]}" --params "$PARAMS" --candidate "$ATT" \
    --candidate "attention+shared: routing.strategy=shared routing.attention_lora=true adapter.placement=parallel" \
    --candidate "attention+routed: routing.strategy=routed routing.attention_lora=true adapter.placement=parallel" &
  # embedded beside attention has no rank within 10 % of 35,000 (rank 1 inside is 40,448): these at 41,000, with
  # attention LoRA alone again at that size
  sweep facts-combined-b "${KAIMING[@]}" --params 41000 --candidate "$ATT" \
    --candidate "attention+embedded-parallel: routing.strategy=embedded routing.attention_lora=true adapter.placement=parallel" \
    --candidate "attention+embedded-inside: routing.strategy=embedded routing.attention_lora=true adapter.placement=inside" &
  wait
  "${PYTHON:-.venv/bin/python}" scripts/evidence_table.py runs/evidence-facts-combined-a/ runs/evidence-facts-combined-b/
  exit 0
fi
sweep facts-trainable-kaiming "${KAIMING[@]}" --params "$PARAMS" --candidate "$ATT" --candidate "$SHARED" \
  --candidate "$ROUTED" --candidate "$EMB" --candidate "$INSIDE" &
{ sweep facts-trainable-perft "${PERFT[@]}" --params "$PARAMS" --candidate "$SHARED" --candidate "$ROUTED" \
    --candidate "$EMB" --candidate "$INSIDE"
  sweep addition-demo-kaiming "${KAIMING[@]}" "${ADDITION[@]}" --params 49152 --candidate "$ATT" --candidate "$SHARED" \
    --candidate "$EMB" --candidate "$INSIDE"; } &
sweep facts-activated-kaiming "${KAIMING[@]}" --params "$PARAMS" --match activated --candidate "$ROUTED" \
  --candidate "$EMB" --candidate "$INSIDE" &
wait
"${PYTHON:-.venv/bin/python}" scripts/evidence_table.py runs/evidence-facts-trainable-kaiming/ \
  runs/evidence-facts-trainable-perft/ runs/evidence-facts-activated-kaiming/ runs/evidence-addition-demo-kaiming/
