"""layerskip: early-exit inference and self-speculative decoding (LayerSkip) for Llama-family models.

    import layerskip
    model = layerskip.load()                      # the embedded default, SmolLM2-135M-Instruct
    result = layerskip.generate(model, "Write a haiku about caches.",
                                generation_strategy="self_speculative", exit_layer=8, num_speculations=4,
                                sample=False, max_steps=64)
    print(result.text, result.stats.acceptance_rate)
"""

from layerskip.api import encode_prompt, generate, load, strategy_for
from layerskip.errors import LayerSkipError
from layerskip.generation import GenerationConfig, GenerationResult

__version__ = "0.1.0"
__all__ = ["GenerationConfig", "GenerationResult", "LayerSkipError", "encode_prompt", "generate", "load", "strategy_for"]
