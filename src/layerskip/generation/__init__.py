"""Decoding: sampling, strategies (autoregressive, early exit, self-speculative), stopping, streaming."""

from layerskip.generation.config import GenerationConfig
from layerskip.generation.engine import BatchEngine, GenerationResult, GenerationStats, generate_ids
from layerskip.generation.sampling import Sampler, Verdict
from layerskip.generation.strategies import Autoregressive, SelfSpeculative, Strategy
from layerskip.generation.streaming import SpeculativeStreamer, Streamer, TextStreamer

__all__ = ["Autoregressive", "BatchEngine", "GenerationConfig", "GenerationResult", "GenerationStats", "Sampler",
           "SelfSpeculative", "SpeculativeStreamer", "Strategy", "Streamer", "TextStreamer", "Verdict", "generate_ids"]
