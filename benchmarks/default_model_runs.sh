#!/usr/bin/env bash
# The embedded default, smollm2-135m-layerskip: its training run, then every figure of docs/TRAINING.md "Results".
# Each step resumes where an interrupted run stopped; rerun the script to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-400}
RUN=runs/smollm2-135m-layerskip
ADAPTER=src/layerskip/adapters/smollm2-135m-layerskip
HELD_OUT_TEXT="src/layerskip /usr/share/doc/python3.11/html/_sources/howto /usr/share/doc/python3.11/html/_sources/tutorial"

# 1. Training (its data: the original model's replies to recipes/data/smollm2_prompts.jsonl, generated first).
layerskip train --config recipes/smollm2_135m_layerskip.yaml steps="$STEPS"
checkpoint=$(ls -d "$RUN"/checkpoints/step_* | tail -n 1)
mkdir -p "$ADAPTER"
cp "$checkpoint"/adapter_config.json "$checkpoint"/adapter_model.safetensors "$checkpoint"/layerskip.json "$ADAPTER"/

# 2. Per-layer exits before (dashed) and after training, and the final layer's perplexity, on held-out text:
#    this package's own source (code) and the Python HOWTOs and tutorial (prose), none of it in the training data.
layerskip exits --model "$ADAPTER" --compare smollm2-135m --data_path $HELD_OUT_TEXT --num_samples 48 \
    --seq_len 256 --gen_tokens 64 --num_speculations 4 --output_dir logs/exits_default

# 3. The decoding settings stored with the model: a sweep on HumanEval chat prompts (not the held-out set below).
layerskip sweep --model "$ADAPTER" --dataset human_eval --num_samples 10 --chat --sample false --max_steps 96 \
    --exit_layers 6,10 --num_speculations 2,3,4,6 --draft_vocab_size 16384 --draft_confidence 0 \
    --output_dir logs/sweep_default --save_defaults "$ADAPTER"

# 4. What a user gets: `layerskip generate` defaults against autoregressive decoding, on held-out prompts.
python benchmarks/bench_default.py --output_dir logs/bench_default
