#!/usr/bin/env bash
# The lm-evaluation-harness run shown in docs/BENCHMARKS.md: the local tasks of benchmarks/tasks on the
# embedded default, autoregressive and self-speculative, greedy, offline.
set -euo pipefail
OUT=${OUT:-logs/eval_runs}
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
COMMON=(--include_path benchmarks/tasks --tasks layerskip_local --sample false --log_samples)
layerskip eval "${COMMON[@]}" --output_dir "$OUT/autoregressive"
layerskip eval "${COMMON[@]}" --generation_strategy self_speculative --exit_layer "${EXIT_LAYER:-26}" \
    --num_speculations "${SPECULATIONS:-6}" --output_dir "$OUT/self_speculative"
# multiple-choice accuracy of early exits: log-likelihoods from layers [0, E) and the shared head
for exit_layer in 8 16 24 30; do
    layerskip eval --include_path benchmarks/tasks --tasks layerskip_local_mc --exit_layer "$exit_layer" \
        --output_dir "$OUT/mc_exit_$exit_layer"
done
