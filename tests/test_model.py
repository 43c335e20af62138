"""Our transformer against transformers.LlamaForCausalLM: full logits, early-exit logits, cached decoding."""

from __future__ import annotations

import json
import os

import pytest
import torch

import layerskip
from layerskip.errors import LayerSkipError
from layerskip.model import KVCache, ModelConfig
from layerskip.model.kernels.prepare import unprepare
from layerskip.model.kernels import native
from layerskip.model.kernels.packed import PACKED_MAX_ROWS

VARIANTS = {
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_untied": dict(num_key_value_heads=2),
    "llama3_rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "explicit_head_dim": dict(head_dim=24, num_attention_heads=4, num_key_value_heads=1),
    "attention_bias": dict(attention_bias=True, rope_theta=500000.0),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tiny_checkpoint, variant):
    folder, hf = tiny_checkpoint(**VARIANTS[variant])
    ours = layerskip.load(str(folder))
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    with torch.inference_mode():
        actual = ours.model(ids)
    assert (actual - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["gqa_untied", "mha_tied"])
def test_early_exit_logits_equal_hf_head_on_hidden_states(tiny_checkpoint, variant):
    folder, hf = tiny_checkpoint(**VARIANTS[variant])
    ours = layerskip.load(str(folder))
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden_states = hf(ids, output_hidden_states=True).hidden_states
    for exit_layer in range(1, ours.config.num_hidden_layers):
        with torch.no_grad():
            expected = hf.lm_head(hf.model.norm(hidden_states[exit_layer]))
        with torch.inference_mode():
            actual = ours.model(ids, exit_layer=exit_layer)
        assert (actual - expected).abs().max().item() < 1e-4, exit_layer


def test_cached_incremental_decoding_equals_one_full_pass(tiny_checkpoint):
    folder, _ = tiny_checkpoint()
    model = layerskip.load(str(folder)).model
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(3))
    cache = KVCache(model.config, 64)
    with torch.inference_mode():
        full = model(ids)
        pieces = [model(ids[:, :10], cache=cache)]
        pieces += [model(ids[:, i:i + 1], start_pos=i, cache=cache) for i in range(10, 20)]
        pieces.append(model(ids[:, 20:], start_pos=20, cache=cache))
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("path", ["plain", "packed", "native"])
def test_batch_rows_at_their_own_positions_decode_as_each_row_alone(tiny_checkpoint, path):
    """Per-row start positions (a tensor [B]): each batch row writes its keys and values at its own slots and attends
    only to its own past, so a batch of sequences of different lengths decodes as each alone; bit-identically
    through the row-invariant native kernels. A row's pass is padded at its end, past its own positions. The second
    pass covers some of the cache's sequences, in another order (`rows`)."""
    if path == "native" and native.load_native() is None:
        pytest.skip("the native kernels do not build here")
    folder, _ = tiny_checkpoint()
    model = layerskip.load(str(folder), cpu_kernels=path).model
    prompts = [[3, 14, 15, 92, 65], [2, 71, 82], [9, 8, 7, 6, 5, 4, 3]]
    steps = [[[5, 6], [7], [8, 9, 10]], [[11], [12, 13], [14]]]  # each row's next tokens, per pass
    with torch.inference_mode():
        alone = []
        for row, prompt in enumerate(prompts):
            cache = KVCache(model.config, 32)
            position = len(prompt)
            model(torch.tensor([prompt]), cache=cache)
            outputs = []
            for step in steps:
                outputs.append(model(torch.tensor([step[row]]), start_pos=position, cache=cache)[0])
                position += len(step[row])
            alone.append(outputs)
        cache = KVCache(model.config, 32, batch_size=3)
        width = max(map(len, prompts))
        model(torch.tensor([prompt + [0] * (width - len(prompt)) for prompt in prompts]), start_pos=torch.zeros(3,
              dtype=torch.long), cache=cache)
        starts = torch.tensor([len(prompt) for prompt in prompts])
        for index, (step, rows) in enumerate(zip(steps, ([0, 1, 2], [2, 0]))):
            width = max(len(step[row]) for row in rows)
            logits = model(torch.tensor([step[row] + [0] * (width - len(step[row])) for row in rows]),
                           start_pos=starts[rows], cache=cache, rows=torch.tensor(rows))
            for batch_row, row in enumerate(rows):
                expected = alone[row][index]
                got = logits[batch_row, :len(step[row])]
                assert torch.equal(got, expected) if path == "native" else torch.allclose(got, expected, atol=1e-5)
            starts = starts + torch.tensor([len(tokens) for tokens in step])


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only CI must have a compiler and ninja")
def test_ci_builds_the_native_kernels():
    """Elsewhere a failed build falls back with a warning; in CI it would hide the native path's tests."""
    assert native.load_native() is not None


@pytest.mark.parametrize("path", ["packed", "native"])
def test_prepared_kernel_paths_decode_like_plain_weights(tiny_checkpoint, path):
    if path == "native" and native.load_native() is None:
        pytest.skip("the native kernels do not build here")
    folder, _ = tiny_checkpoint(attention_bias=True)
    model = layerskip.load(str(folder), cpu_kernels=path).model
    assert model.kernel_path == path and model.prepared["head"].path == path
    assert model.row_invariant == (path == "native")
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(4))

    def decode_one_by_one():
        cache = KVCache(model.config, 12)
        with torch.inference_mode():
            return torch.cat([model(ids[:, i:i + 1], start_pos=i, cache=cache) for i in range(12)], dim=1)

    prepared = decode_one_by_one()
    with torch.inference_mode():
        prefill = model(ids)  # a long pass: the native path serves it too
    unprepare(model)
    plain = decode_one_by_one()
    assert (prepared - plain).abs().max().item() < 1e-5
    assert (prefill - plain).abs().max().item() < 1e-5


def test_cpu_kernels_auto_takes_native_else_the_path_that_times_faster(tiny_checkpoint, monkeypatch):
    from layerskip.model.kernels import prepare

    folder, _ = tiny_checkpoint()
    monkeypatch.delenv("LAYERSKIP_CPU_KERNELS", raising=False)
    assert isinstance(prepare.packing_pays(layerskip.load(str(folder), cpu_kernels="packed").model), bool)
    if native.load_native() is not None:
        assert layerskip.load(str(folder)).model.kernel_path == "native"
    monkeypatch.setattr(native, "load_native", lambda: None)  # as where the extension cannot build
    for pays in (True, False):
        monkeypatch.setattr(prepare, "packing_pays", lambda model, pays=pays: pays)
        assert layerskip.load(str(folder)).model.kernel_path == ("packed" if pays else "plain")
    loaded = layerskip.load(str(folder), cpu_kernels="plain")
    assert loaded.model.kernel_path == "plain" and not loaded.model.prepared
    with pytest.raises(LayerSkipError, match="unknown cpu_kernels 'fast': choose one of auto, native, packed, plain"):
        layerskip.load(str(folder), cpu_kernels="fast")
    with pytest.raises(LayerSkipError, match="the native kernels are not available"):
        layerskip.load(str(folder), cpu_kernels="native")
    # The environment forces a path for a whole run; an explicit argument still wins.
    monkeypatch.setattr(prepare, "packing_pays", lambda model: False)
    monkeypatch.setenv("LAYERSKIP_CPU_KERNELS", "packed")
    assert layerskip.load(str(folder)).model.kernel_path == "packed"
    assert layerskip.load(str(folder), cpu_kernels="plain").model.kernel_path == "plain"
    monkeypatch.setenv("LAYERSKIP_CPU_KERNELS", "fast")
    with pytest.raises(LayerSkipError, match="unknown LAYERSKIP_CPU_KERNELS 'fast': choose one of auto, native"):
        layerskip.load(str(folder))


def test_embedded_default_logits_match_transformers_gguf_loader(default_model):
    """transformers dequantizes the same GGUF with its own code: an independent check of our loader.

    With torch's kernels a long pass (a prefill of more than PACKED_MAX_ROWS tokens) runs the same GEMM as
    transformers: under 1e-4. Our native kernels (every pass; each output one chain of fused multiply-adds over
    k) and oneDNN-prepacked weights (short passes) sum in other orders: logits of scale ~30 move by up to about
    1e-4 in a prefill, and a few 1e-4 after decoding steps, bounded here at 2e-4 and 1e-3.
    """
    from transformers import AutoModelForCausalLM

    from layerskip.loading.default_model import embedded_gguf_path

    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    text = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, counting from zero.\"\"\"\n" * 3
    ids = torch.tensor([default_model.tokenizer.encode(text)])
    assert ids.shape[1] - 3 > PACKED_MAX_ROWS
    with torch.no_grad():
        expected = hf(ids).logits
    model = default_model.model
    cache = KVCache(model.config, ids.shape[1])
    with torch.inference_mode():
        prefill = model(ids[:, :-3], cache=cache)
        steps = [model(ids[:, i:i + 1], start_pos=i, cache=cache) for i in range(ids.shape[1] - 3, ids.shape[1])]
    assert default_model.config.num_hidden_layers == 30
    assert (prefill - expected[:, :-3]).abs().max().item() < 2e-4
    assert (torch.cat(steps, dim=1) - expected[:, -3:]).abs().max().item() < 1e-3


@pytest.mark.parametrize("raw, fragment", [
    ({"model_type": "mixtral", "num_local_experts": 8}, "unsupported architecture 'mixtral'"),
    ({"model_type": "gemma"}, "unsupported architecture 'gemma'"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
])
def test_unsupported_architectures_are_refused_with_what_is_supported(tmp_path, raw, fragment):
    config = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, **raw}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayerSkipError, match=fragment) as error:
        layerskip.load(str(tmp_path))
    assert "Llama-family" in str(error.value)


def test_mistral_sliding_window_caps_the_context():
    config = ModelConfig.from_hf_dict({"model_type": "mistral", "vocab_size": 10, "hidden_size": 8,
                                       "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                       "max_position_embeddings": 32768, "sliding_window": 4096})
    assert config.max_position_embeddings == 4096
