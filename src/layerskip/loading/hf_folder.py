"""Hugging Face checkpoint folders: config.json, safetensors (single or sharded), generation_config.json.

Weights are only ever read from safetensors; pickled `.bin`/`.pth` files are refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from layerskip.errors import LayerSkipError
from layerskip.model import ModelConfig, Transformer
from layerskip.model.kernels.linear import BITS_PER_WEIGHT
from layerskip.model.parallel import Shard, TensorParallel
from layerskip.model.transformer import rope_inverse_frequencies

GENERATION_DEFAULTS_FILE = "layerskip.json"
# A GGUF file's quantized weights as they are (uint8 GGUF blocks), beside the float weights converted from
# them, so that decoding can run from the file's own blocks (`load(..., quantize=...)`). In a subfolder: the
# float weights are every *.safetensors file of the folder itself.
BLOCKS_FILE = Path("gguf_blocks") / "blocks.safetensors"


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LayerSkipError(f"cannot read {path}: {error}") from None


def read_config(folder: Path) -> ModelConfig:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LayerSkipError(f"{folder} is not a model checkpoint: it has no config.json")
    return ModelConfig.from_hf_dict(read_json(config_path), source=str(config_path))


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: the shards named by the index, or the single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise LayerSkipError(f"{index}: 'weight_map' must be an object of tensor name -> file name")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [file.name for file in files if not file.is_file()]
        if absent:
            raise LayerSkipError(f"{index} names weight file {absent[0]}, which {folder} lacks")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")) or any(folder.glob("*.pt")):
        raise LayerSkipError(f"{folder} has only pickled weights (.bin/.pth), which layerskip never unpickles: "
                             "convert them to safetensors first")
    raise LayerSkipError(f"{folder} is not a model checkpoint: it has no *.safetensors weights")


def read_tensors(file: Path, shard: Shard | None = None, head_dim: int = 0,
                 bytes_per_element: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (HF's "model." prefix stripped); with a tensor-parallel `shard`, only this
    rank's slice of each sharded one is read. `bytes_per_element`: for GGUF block rows, whose columns are bytes."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), "pt") as tensors:
            for stored in tensors.keys():
                name = stored.removeprefix("model.")
                cut = shard.cut(name, head_dim) if shard is not None else None
                if cut is None:
                    state[name] = tensors.get_tensor(stored)
                    if shard is not None and shard.rank and shard.reduced_bias(name):
                        state[name] = torch.zeros_like(state[name])
                    continue
                dim, start, end = cut
                if dim == 1 and bytes_per_element is not None:
                    scale = bytes_per_element[name]
                    if start * scale % 1 or end * scale % 1:
                        continue  # not whole blocks: the float weights' slice is quantized instead
                    start, end = int(start * scale), int(end * scale)
                part = tensors.get_slice(stored)
                state[name] = part[start:end] if dim == 0 else part[:, start:end]
    except (SafetensorError, OSError) as error:
        raise LayerSkipError(f"cannot read weights {file}: {error}") from None
    return state


def load_state_dict(folder: Path, shard: Shard | None = None, head_dim: int = 0) -> dict[str, torch.Tensor]:
    """All weights of a folder (or this rank's slices of them), with our module names."""
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        state.update(read_tensors(file, shard, head_dim))
    return state


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype,
                device: torch.device | str, folder: Path | None = None,
                parallel: TensorParallel | None = None) -> Transformer:
    """A model whose parameters are the given tensors, built without a wasted random initialisation; a
    LayerSkipError names a missing, unexpected or misshapen tensor (and the checkpoint `folder`, when given).
    Under tensor parallelism `config` and `state` are this rank's (model/parallel.py)."""
    mismatch = f"the weights in {folder} do not match its config.json" if folder else "weights do not match config.json"
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(config, parallel)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise LayerSkipError(f"{mismatch}: {detail}")
    shapes = model.state_dict()
    for name in (name for name in shapes if name in expected):  # in module order: layer 0's q_proj first
        want, have = tuple(shapes[name].shape), tuple(state[name].shape)
        if have != want:
            raise LayerSkipError(f"{mismatch}: tensor '{name}' has shape {list(have)}, "
                                 f"config.json implies {list(want)}{shape_hint(config, name)}")
        if not (state[name].is_floating_point() and state[name].dtype.itemsize >= 2):
            raise LayerSkipError(f"{mismatch}: tensor '{name}' holds {str(state[name].dtype).removeprefix('torch.')}, "
                                 "not floating-point weights")
    state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inverse_frequencies(config).to(device)  # the meta-device buffer holds no data
    return model.eval()


def shape_hint(config: ModelConfig, name: str) -> str:
    """What in config.json sets a tensor's shape, for the projections whose rows count heads."""
    if name.endswith("q_proj.weight") or name.endswith("o_proj.weight"):
        return (f" (num_attention_heads {config.num_attention_heads} x head_dim {config.head_dim}, "
                f"hidden_size {config.hidden_size})")
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        return (f" (num_key_value_heads {config.num_key_value_heads} x head_dim {config.head_dim}, "
                f"hidden_size {config.hidden_size})")
    return ""


def eos_token_ids(folder: Path) -> list[int]:
    """Every end-of-sequence id that the config files name (chat models often have several)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        value = read_json(path).get("eos_token_id") if path.is_file() else None
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids


def generation_defaults(folder: Path) -> dict[str, Any]:
    """Decoding settings stored with a model (for example the best exit layer from a sweep)."""
    path = folder / GENERATION_DEFAULTS_FILE
    return read_json(path) if path.is_file() else {}


def update_generation_defaults(folder: Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Store decoding settings with a model (a sweep's best point, a benchmark's batch limit), other keys kept."""
    stored = {**generation_defaults(folder), **updates}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / GENERATION_DEFAULTS_FILE).write_text(json.dumps(stored, indent=1) + "\n")
    return stored


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `target` in one rename (a failure leaves target as it was)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the checkpoint private
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_hf_weights(folder: Path, state: dict[str, torch.Tensor], *, tied: bool) -> None:
    """model.safetensors with HF names ("model." before decoder weights); lm_head.weight left out when tied."""
    tensors = {(name if name.startswith("lm_head.") else f"model.{name}"): tensor.contiguous()
               for name, tensor in state.items() if not (tied and name == "lm_head.weight")}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def stored_blocks(folder: Path, shard: Shard | None = None,
                  head_dim: int = 0) -> dict[str, tuple[str, torch.Tensor]] | None:
    """The GGUF blocks kept with a converted folder: parameter name -> (format, uint8 blocks [rows, bytes]); with a
    tensor-parallel `shard`, this rank's slices (a slice that is not whole blocks is left out)."""
    path = folder / BLOCKS_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as blocks:
        formats = blocks.metadata() or {}
    per_element = {name: BITS_PER_WEIGHT[weight_format] / 8 for name, weight_format in formats.items()}
    return {name: (formats[name], data) for name, data in read_tensors(path, shard, head_dim, per_element).items()}


def save_hf_folder(folder: Path, config: ModelConfig, state: dict[str, torch.Tensor], *,
                   eos_ids: list[int] | None = None, tokenizer: Any = None,
                   blocks: dict[str, tuple[str, torch.Tensor]] | None = None) -> None:
    """Write a complete HF checkpoint atomically (with a GGUF file's blocks, if given)."""
    with atomic_folder(folder) as staging:
        save_hf_weights(staging, state, tied=config.tie_word_embeddings)
        if blocks:
            (staging / BLOCKS_FILE).parent.mkdir()
            save_file({name: data.contiguous() for name, (_, data) in blocks.items()}, staging / BLOCKS_FILE,
                      metadata={name: weight_format for name, (weight_format, _) in blocks.items()})
        (staging / "config.json").write_text(json.dumps(
            {**config.to_hf_dict(), **({"eos_token_id": eos_ids} if eos_ids else {})}, indent=2))
        if eos_ids:
            (staging / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
