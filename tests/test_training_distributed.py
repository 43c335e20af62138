"""Two processes under torchrun (gloo, FSDP2 on CPU) train like one process with the same global batch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import layerskip
from layerskip.training import load_config
from layerskip.training.distributed import setup_distributed
from layerskip.training.trainer import Run

WORKER = textwrap.dedent("""
    import json
    import sys
    import torch
    from layerskip.training import load_config
    from layerskip.training.distributed import full_tensor, setup_distributed
    from layerskip.training.trainer import Run

    context = setup_distributed("cpu")
    for variant, overrides in json.loads(sys.argv[3]).items():
        config = load_config(sys.argv[1], [f"output_dir={sys.argv[2]}/{variant}", *overrides])
        run = Run(config, context)
        run.train()
        params = {name: full_tensor(p) for name, p in run.module.named_parameters()}
        torch.save(params, f"{sys.argv[2]}/{variant}/params_rank{context.rank}.pt")
    context.close()
""")

VARIANTS = {"full": [], "lora": ["lora.enabled=true", "lora.rank=4", "early_exit.distill_weight=0.5"]}
RECIPE = """
model: {model}
steps: 3
seed: 7
device: cpu
log_every: 1
data:
  sources: [{{path: {data}, field: input_ids}}]
  seq_len: 16
  batch_size: 2
optim: {{lr: 3.0e-3, warmup_steps: 1, grad_accum: 1}}
layer_dropout: {{p_max: 0.5, layer_shape: linear}}
early_exit: {{curriculum: rotational, rotation: 2, e_scale: 0.5}}
"""


def losses(path: Path) -> list[float]:
    with path.open(newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint()
    data = tmp_path / "ids.jsonl"
    generator = torch.Generator().manual_seed(0)
    data.write_text("".join(json.dumps({"input_ids": torch.randint(0, 97, (60,), generator=generator).tolist()}) + "\n"
                            for _ in range(8)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=folder, data=data))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(worker), str(recipe), str(tmp_path / "ddp"), json.dumps(VARIANTS)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    for variant, extra in VARIANTS.items():
        ranks = [torch.load(tmp_path / "ddp" / variant / f"params_rank{rank}.pt") for rank in (0, 1)]
        assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
        # One process, two micro-batches of 2: the same 4 samples per step, the same layer-dropout columns.
        single = Run(load_config(recipe, [f"output_dir={tmp_path / 'single' / variant}", "optim.grad_accum=2", *extra]),
                     setup_distributed("cpu"))
        single.train()
        for name, parameter in single.module.named_parameters():
            # One process keeps LoRA's frozen weights in bfloat16 (under bf16 autocast: the same numbers).
            reference = ranks[0][name].to(parameter.dtype)
            assert torch.allclose(parameter.detach().float(), reference.float(), atol=2e-5), name
        assert losses(tmp_path / "ddp" / variant / "metrics.csv") == pytest.approx(
            losses(tmp_path / "single" / variant / "metrics.csv"), rel=1e-5)
    # The checkpoint written from the sharded model holds the gathered weights, and loads for generation.
    checkpoint = tmp_path / "ddp" / "full" / "checkpoints" / "step_0000003"
    saved = load_file(checkpoint / "model.safetensors")
    full = torch.load(tmp_path / "ddp" / "full" / "params_rank0.pt")
    for name, tensor in full.items():
        ours = name.removeprefix("model.")
        assert torch.equal(saved[ours if ours.startswith("lm_head.") else f"model.{ours}"], tensor)
    assert layerskip.load(str(checkpoint)).config.num_hidden_layers == 4
