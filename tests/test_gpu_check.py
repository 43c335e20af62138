"""benchmarks/gpu_check.py, the prepared GPU check, run on the CPU on a tiny shape: every block measured or said
why not, the costs against a reference, the identities, the time budget, and its one-line error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_check_runs_every_block_on_a_cpu(gpu_check, tmp_path, capsys):
    output = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--shapes", "tiny", "--formats", "fp32,int4", "--backend", "aot_eager",
                           "--output", str(output)]) == 0
    records = json.loads(output.read_text())["records"]
    assert [(r["format"], r["mode"]) for r in records] == [("fp32", "eager"), ("int4", "eager"), ("fp32", "compiled"),
                                                           ("int4", "compiled")]
    eager, quantized, compiled, refused = records
    assert eager["self_speculative_equals_plain"] and quantized["self_speculative_equals_plain"]
    assert compiled["compiled_equals_eager"] and compiled["compile"]["kept"]
    assert "q4_1 weights run only through the native CPU kernels" in refused["skipped"]
    config = gpu_check.SHAPES["tiny"]
    layer_params = config.num_hidden_layers * (config.hidden_size * config.head_dim * (
        2 * config.num_attention_heads + 2 * config.num_key_value_heads) + 3 * config.hidden_size
        * config.intermediate_size)
    head = config.vocab_size * config.hidden_size
    assert eager["weight_bytes"] == 4 * (layer_params + head)  # float32, the tied head counted once
    assert quantized["weight_bytes"] == pytest.approx(5 / 8 * (layer_params + head))  # Q4_1: 20 bytes per 32
    assert eager["c_d_bytes_model"] == pytest.approx((layer_params / 4 + head) / (layer_params + head))
    for record in (eager, compiled, quantized):
        assert sorted(map(int, record["c_v"])) == list(range(2, 9)) and record["tokens_per_second"] > 0
        assert 0 < record["of_bound"] < 1 and record["c_d"] > 0
    table = capsys.readouterr().out
    assert "| tiny | fp32 | compiled |" in table and "greedy identity: 3 of 3 checks identical" in table


def test_blocks_past_the_time_budget_are_reported_as_skipped(gpu_check, tmp_path):
    output = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--shapes", "tiny", "--formats", "fp32", "--modes", "eager",
                           "--time_budget", "0", "--output", str(output)]) == 0
    assert [r.get("skipped") for r in json.loads(output.read_text())["records"]] == ["time budget"]


def test_random_models_have_the_published_shapes(gpu_check):
    from layerskip.model import Transformer

    with torch.device("meta"):
        one_b, eight_b = (Transformer(gpu_check.SHAPES[name]) for name in ("llama-3.2-1b", "llama-3-8b"))
    assert sum(p.numel() for p in one_b.parameters()) == 1_235_814_400  # Llama-3.2-1B, the head tied
    assert sum(p.numel() for p in eight_b.parameters()) == 8_030_261_248  # Llama-3-8B
    tiny = gpu_check.random_model(gpu_check.SHAPES["tiny"], torch.float32, torch.device("cpu"))
    assert tiny.lm_head.weight is tiny.embed_tokens.weight
    assert torch.equal(tiny.norm.weight, torch.ones_like(tiny.norm.weight))
    assert abs(tiny.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 1e-3


def test_unknown_names_are_one_line_errors(gpu_check, capsys):
    assert gpu_check.main(["--shapes", "llama-9b"]) == 2
    assert capsys.readouterr().err.strip() == "gpu_check: error: unknown shape, format or mode 'llama-9b'"
