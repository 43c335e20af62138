#!/usr/bin/env bash
# The embedded default's LayerSkip training and every figure of docs/TRAINING.md "Results": train, analyse the
# exits, sweep for the decoding settings, time what a user would get, and ship the adapter if it wins.
# Each step resumes where an interrupted run stopped; rerun the script to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/smollm2-135m-layerskip
CANDIDATE=$RUN/candidate                     # the adapter with its stored settings, before it ships
SHIPPED=src/layerskip/adapters/smollm2-135m-layerskip
HELD_OUT_TEXT="src/layerskip /usr/share/doc/python3.11/html/_sources/howto /usr/share/doc/python3.11/html/_sources/tutorial"

# 1. Training (its data, the original model's replies to recipes/data/smollm2_prompts.jsonl, is generated first).
layerskip train --config recipes/smollm2_135m_layerskip.yaml "$@"
checkpoint=$(ls -d "$RUN"/checkpoints/step_* | tail -n 1)
mkdir -p "$CANDIDATE"
cp "$checkpoint"/adapter_config.json "$checkpoint"/layerskip.json "$CANDIDATE"/
# The checkpoint keeps float32 (exact resume); the candidate is stored in bfloat16, half the size, as it ships.
python -c 'import sys, torch; from safetensors.torch import load_file, save_file
save_file({k: v.to(torch.bfloat16) for k, v in load_file(sys.argv[1]).items()}, sys.argv[2], metadata={"format": "pt"})' \
    "$checkpoint"/adapter_model.safetensors "$CANDIDATE"/adapter_model.safetensors

# 2. The decoding settings stored with the model: a sweep on HumanEval chat prompts (not the held-out set below).
#    Self-speculative becomes the stored strategy only if its best point beats autoregressive decoding by 5%.
layerskip sweep --model "$CANDIDATE" --dataset human_eval --num_samples 6 --chat --sample false --max_steps 64 \
    --exit_layers 8 --num_speculations 2,4,6 --draft_confidence 0,0.8,0.9 --draft_vocab_size 16384 \
    --output_dir logs/sweep_default --save_defaults "$CANDIDATE"

# 3. Per-layer exits before (dashed) and after training, and the final layer's perplexity, on held-out text:
#    this package's own source (code) and the Python HOWTOs and tutorial (prose), none of it in the training data.
layerskip exits --model "$CANDIDATE" --compare smollm2-135m --data_path $HELD_OUT_TEXT --num_samples 24 \
    --seq_len 256 --gen_tokens 48 --num_speculations 4 --output_dir logs/exits_default

# 4. What a user would get: `layerskip generate` with the stored settings against autoregressive decoding,
#    on held-out code and prose prompts, greedy and sampled.
python benchmarks/bench_default.py --model "$CANDIDATE" --max_steps 64 --output_dir logs/bench_default

# 5. Ship it (it becomes the default model) only when its stored strategy is self-speculative.
if grep -q '"generation_strategy": "self_speculative"' "$CANDIDATE"/layerskip.json; then
    mkdir -p "$SHIPPED" && cp "$CANDIDATE"/* "$SHIPPED"/
    echo "shipped: $SHIPPED"
else
    echo "not shipped: self-speculation did not beat autoregressive decoding (logs/sweep_default/sweep/sweep.csv)"
fi
