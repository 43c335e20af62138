"""The engine's model: config, transformer with ranged layer execution, and static caches."""

from layerskip.model.cache import ExitHiddenBuffer, KVCache
from layerskip.model.config import ModelConfig
from layerskip.model.transformer import Transformer

__all__ = ["ExitHiddenBuffer", "KVCache", "ModelConfig", "Transformer"]
