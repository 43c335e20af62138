"""Static-shape decoding passes (model/static.py): the slot-indexed cache write and whole-capacity attention against
the eager path, compiled passes decoding the same greedy tokens as eager ones (one sequence and a batch) without
recompiling for new lengths, and `--compile`'s report."""

from __future__ import annotations

import json

import pytest
import torch

import layerskip
from layerskip import cli
from layerskip.model import KVCache
from layerskip.model.static import CACHE_MIN, CompiledSteps, enable_compiled_steps, padded_rows

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7]]
STRATEGIES = {"autoregressive": dict(generation_strategy="autoregressive"),
              "self_speculative": dict(generation_strategy="self_speculative", exit_layer=2, num_speculations=3)}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from conftest import make_hf_model

    folder = tmp_path_factory.mktemp("tiny_static")
    make_hf_model(num_hidden_layers=4).save_pretrained(folder)
    return folder


def test_rows_pad_to_a_power_of_two_when_the_cache_has_room():
    assert [padded_rows(rows, 0, 64) for rows in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert padded_rows(5, 60, 64) == 5  # no room for the padding: the exact width


def test_slot_indexed_passes_equal_the_eager_ones(tiny_folder):
    """The same passes, once with the position as an int (the eager path: the cache read up to the pass's end) and
    once with each row's slots as a tensor (the static path: written by indexing, the whole capacity read under a
    mask), through a prompt, a verification with a tree draft's hidden sibling, and a batch at its own rows."""
    model = layerskip.load(str(tiny_folder), cpu_kernels="plain").model
    config = model.config
    torch.manual_seed(0)
    caches = [KVCache(config, 32, batch_size=2) for _ in range(2)]
    prompt, verify = torch.randn(1, 6, config.hidden_size), torch.randn(1, 4, config.hidden_size)
    with torch.inference_mode():
        outputs = []
        for cache, static in zip(caches, (False, True)):
            def at(first: int, length: int, rows: list[int]) -> int | torch.Tensor:
                return torch.arange(first, first + length).repeat(len(rows), 1) if static else first

            row = torch.tensor([1])
            outputs.append(model.forward_layers(prompt, 0, 4, at(0, 6, [1]), cache, rows=row))
            cache.set_attendable(8, 9, False, 1)  # slot 8 holds slot 9's sibling: hidden from slot 9
            outputs.append(model.forward_layers(verify, 0, 4, at(6, 4, [1]), cache, positions=[6, 7, 8, 8], rows=row))
            both = torch.cat([verify[:, :2], verify[:, 2:]])
            starts = torch.tensor([3, 10])
            slots = starts[:, None] + torch.arange(2) if static else starts
            outputs.append(model.forward_layers(both, 0, 4, slots, cache, rows=torch.tensor([0, 1])))
    half = len(outputs) // 2
    for eager, static in zip(outputs[:half], outputs[half:]):
        torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].keys, caches[0].keys, rtol=1e-5, atol=1e-5)


def decode(loaded, strategy: dict, batch: bool) -> list[list[int]]:
    """Greedy tokens of each prompt alone, and (`batch`) of the prompts as one batch."""
    options = dict(max_steps=16, sample=False, ignore_eos=True, **strategy)
    alone = [layerskip.generate(loaded, prompt_ids=ids, **options).token_ids for ids in PROMPTS]
    if not batch:
        return alone
    config = layerskip.api.GenerationConfig.from_options(options).resolved(
        loaded.config.num_hidden_layers, loaded.defaults, loaded.config.vocab_size)
    together = layerskip.api.generate_batch(loaded, PROMPTS, config, batch_size=2, max_speculative_batch=0)
    return alone + [result.token_ids for result in together]


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_passes_decode_the_eager_tokens_without_recompiling(tiny_folder, backend):
    """Inductor's graphs (plain decoding alone: two of them) and, through the traced graphs run op by op (aot_eager:
    seconds instead of a minute of C++ compiling), self-speculation alone and in a batch; then another prompt length
    that needs no graph of its own."""
    from torch._dynamo.utils import counters

    from conftest import assert_same_greedy_tokens

    eager = layerskip.load(str(tiny_folder), cpu_kernels="plain")
    compiled = layerskip.load(str(tiny_folder), cpu_kernels="plain")
    compiled.model.compiled_steps = CompiledSteps(compiled.model, backend=backend)
    inductor = backend == "inductor"
    strategies = ["autoregressive"] if inductor else list(STRATEGIES)
    for name in strategies:
        expected, actual = (decode(loaded, STRATEGIES[name], batch=not inductor) for loaded in (eager, compiled))
        for prompt, one, many in zip(PROMPTS * 2, expected, actual):
            assert len(many) == 16
            assert_same_greedy_tokens(eager, prompt, one, many, row_invariant=False)
    graphs = counters["stats"]["unique_graphs"]
    again = layerskip.generate(compiled, prompt_ids=[4, 4, 4, 4, 4, 4, 4], max_steps=12, sample=False,
                               ignore_eos=True, **STRATEGIES[strategies[-1]])
    assert counters["stats"]["unique_graphs"] == graphs  # another length, the same graphs
    assert len(again.token_ids) == 12
    assert set(compiled.model.compiled_steps.caches) == {(CACHE_MIN, 1)} | (set() if inductor else {(CACHE_MIN, 2)})


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_compiled_passes_run_torchs_quantized_weights(tiny_folder, weight_format):
    """The GPU's formats (torch_quant.py) inside the traced graph, here through their CPU ops: the same tokens as
    eager, and every prepared weight among the tensors that CUDA graphs must not copy at each replay."""
    from conftest import assert_same_greedy_tokens
    from layerskip.model.kernels.torch_quant import prepare_torch_quantized

    eager, compiled = (layerskip.load(str(tiny_folder), cpu_kernels="plain") for _ in range(2))
    for loaded in (eager, compiled):
        prepare_torch_quantized(loaded.model, weight_format)
    steps = compiled.model.compiled_steps = CompiledSteps(compiled.model, backend="aot_eager")
    fixed = {id(tensor) for tensor in steps.fixed_tensors()}
    prepared = [linear for module in compiled.model.prepared_modules() for linear in module.prepared.values()]
    assert len(prepared) == 4 * 4 + 1
    assert all(id(tensor) in fixed for linear in prepared for tensor in vars(linear).values()
               if isinstance(tensor, torch.Tensor))
    options = dict(max_steps=12, sample=False, ignore_eos=True, **STRATEGIES["self_speculative"])
    expected, actual = (layerskip.generate(loaded, prompt_ids=PROMPTS[0], **options).token_ids
                        for loaded in (eager, compiled))
    assert_same_greedy_tokens(eager, PROMPTS[0], expected, actual, row_invariant=False)


def test_compiling_reports_what_it_kept(tiny_folder, capsys):
    """On the CPU a block-quantized model stays eager (no traced graph holds its blocks); a float model's passes
    are compiled, timed against the eager path, and kept only if faster: either way the report says, and the CLI
    prints it and puts it in the JSON settings."""
    quantized = layerskip.load(str(tiny_folder), quantize="int8")
    report = enable_compiled_steps(quantized.model)
    assert not report.kept and "q8_0 weights run only through the native CPU kernels" in report.reason
    assert quantized.model.compiled_steps is None and quantized.model.kernel_path == "native"

    assert cli.main(["generate", "--model", str(tiny_folder), "--prompt_ids", "1,2,3", "--max_steps", "4",
                     "--sample", "false", "--generation_strategy", "autoregressive", "--compile",
                     "--output", "json"]) == 0
    out, err = capsys.readouterr()
    settings = json.loads(out)["settings"]
    line = next(line for line in err.splitlines() if line.startswith("layerskip: --compile "))
    assert ("not kept" in line) == (not settings["compile"]["kept"])
    assert settings["compile"]["compiled_ms"] > 0 and settings["compile"]["eager_ms"] > 0
    assert settings["cpu_kernels"] == ("compiled" if settings["compile"]["kept"] else
                                       layerskip.load(str(tiny_folder)).model.kernel_path)
