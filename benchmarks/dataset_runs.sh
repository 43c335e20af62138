#!/usr/bin/env bash
# The dataset runs shown in docs/BENCHMARKS.md, on the embedded default model: HumanEval and a custom JSONL
# set through our engine and HF transformers side by side, a sweep, and a correctness check.
# Every run writes as it goes under $OUT and resumes when the script is run again.
set -euo pipefail
OUT=${OUT:-logs/dataset_runs}
# HumanEval as a chat task: the instruct model answers with the function, whose definitions are executed.
HUMAN_EVAL=(--dataset human_eval --num_samples 30 --chat --sample false --max_steps 128)
SHORT=(--dataset custom_jsonl --data_path benchmarks/data/short_answers.jsonl --chat --sample false --max_steps 32)
SPECULATIVE=(--generation_strategy self_speculative --exit_layer "${EXIT_LAYER:-26}" --num_speculations "${SPECULATIONS:-6}")

layerskip benchmark "${HUMAN_EVAL[@]}" --execute_code --compare hf --resume --output_dir "$OUT"
layerskip benchmark "${HUMAN_EVAL[@]}" --execute_code --compare hf --resume --output_dir "$OUT" "${SPECULATIVE[@]}"
layerskip benchmark "${SHORT[@]}" --compare hf --resume --output_dir "$OUT"
layerskip benchmark "${SHORT[@]}" --compare hf --resume --output_dir "$OUT" "${SPECULATIVE[@]}"
layerskip sweep --dataset human_eval --num_samples 8 --chat --sample false --max_steps 64 \
    --exit_layers 12,20,26 --num_speculations 2,4,6 --output_dir "$OUT"
layerskip correctness "${HUMAN_EVAL[@]}" --exit_layer 20 --num_speculations 4 --resume --output_dir "$OUT/correctness"
