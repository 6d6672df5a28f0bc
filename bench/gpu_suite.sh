#!/usr/bin/env bash
# The GPU measurements of the performance and scaling issues, as one prepared command for a
# single-GPU machine (H100 / H200): throughput of ours vs peft at t5-v1_1 Base, Large, XL
# and XXL (random weights, published dimensions), the SVGD share at M = 8, ZeRO-3 against
# the replicated backbone, and fused AdamW (replicated, every size but XXL) and torch.compile
# (replicated, the first model) against ours without them.
# Every figure goes to $OUT (default bench/results) as JSON.
#
#   ../shared/tools/device-wheels.sh            # here, once: DeepSpeed and friends into .whl
#   # on the GPU machine (carry .whl), from the project root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH \
#       && bench/gpu_suite.sh
#
# Sized for one call of at most 10 minutes: 7 runs of at most PER_RUN_TIMEOUT (80 s) each.
# Knobs (environment): MODELS, BATCH, SEQ, PROMPT, STEPS, WINDOWS, PER_RUN_TIMEOUT. On CPU the
# same script runs as a smoke test: MODELS=tiny BATCH=8 SEQ=64 PROMPT=8 bench/gpu_suite.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The deepspeed launcher, also where pip --target left its script off PATH.
if command -v deepspeed > /dev/null; then
    LAUNCH=(deepspeed)
else
    LAUNCH=(python3 -m deepspeed.launcher.runner)
fi
OUT="${OUT:-bench/results}"
MODELS="${MODELS:-random:t5-v1_1-base random:t5-v1_1-xl random:t5-v1_1-xxl}"
BATCH="${BATCH:-32}"
SEQ="${SEQ:-256}"
PROMPT="${PROMPT:-100}"
STEPS="${STEPS:-5}"
WINDOWS="${WINDOWS:-3}"
PER_RUN_TIMEOUT="${PER_RUN_TIMEOUT:-80}"
export BPT_DS_CACHE="${BPT_DS_CACHE:-/tmp/bpt_ds_cache}"
mkdir -p "$OUT"
failed=0

run() {  # name, then bench/throughput.py arguments
    local name="$1"
    shift
    echo "== $name"
    if ! timeout -k 10 "$PER_RUN_TIMEOUT" "${LAUNCH[@]}" --num_gpus 1 bench/throughput.py --batch "$BATCH" \
            --seq "$SEQ" --prompt-length "$PROMPT" --target-len 8 --steps "$STEPS" --windows "$WINDOWS" \
            --json "$OUT/throughput_${name}.json" "$@"; then
        echo "== $name failed or timed out (see above)"
        failed=1
    fi
}

for model in $MODELS; do
    tag="${model#random:}"
    case "$tag" in
        # XXL: ZeRO-3 (zero.Init draws the weights on the GPU), ours only, with activation
        # checkpointing (python -m bpt_ds.plan --model t5-v1_1-xxl --batch 32 --seq 256
        # --prompt-length 100: ~91 GiB without it, ~33 GiB with it on one GPU).
        *xxl) run "${tag}_zero3" --model "$model" --ds-config ds_configs/zero3_bf16.json --rows ours \
                  --micro "$BATCH" --set model.gradient_checkpointing=true ;;
        # Ours against both peft rows, then the replicated backbone at the same size with torch's
        # fused AdamW beside it.
        *) run "${tag}_zero3" --model "$model" --ds-config ds_configs/zero3_bf16.json --micro "$BATCH"
           run "${tag}_replicated" --model "$model" --ds-config ds_configs/replicated_bf16.json \
               --rows ours,ours-fused --micro "$BATCH" ;;
    esac
done
# SVGD's share of the step at M = 8 on the XL-sized backbone (or the first model on CPU).
svgd_model="random:t5-v1_1-xl"
case "$MODELS" in *t5-v1_1-xl*) ;; *) svgd_model="${MODELS%% *}" ;; esac
run "svgd_m8" --model "$svgd_model" --stage bmtpt-source --particles 8 --rows ours \
    --ds-config ds_configs/zero3_bf16.json
# Last, since compilation time is the least predictable: torch.compile (inductor) on the first
# model with the replicated backbone (under ZeRO-3 the graph breaks at every module). The
# compilation falls in the 4 warm-up steps.
first="${MODELS%% *}"
run "${first#random:}_compiled" --model "$first" --ds-config ds_configs/replicated_bf16.json \
    --rows ours,ours-compiled --warmup 4 --micro "$BATCH"
exit "$failed"
