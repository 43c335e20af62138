"""LayerSkip training: layer dropout, the early-exit loss and its curricula, and the recipe that uses them.

Reusable components (each independent of the recipe):
    layer_dropout.LayerDropout     p(l, t) = S(t) D(l) p_max, per sample, one random stream for all ranks
    early_exit_loss                e(l) scales, normalised weights, chunked head + cross-entropy (+ KL)
    curriculum                     rotational and gradual exit curricula, checkpointable
    lora                           LoRALinear, adapters in peft's file format, merge_lora
    model.TrainingModel            the decoder's training forward with all of the above
The recipe: config.TrainConfig (YAML + overrides), data (sources, tokenising, packing), checkpoint
(HF folders, exact resume), distributed (torchrun, FSDP2), trainer.train.

    from layerskip.training import load_config, train
    checkpoint = train(load_config("recipes/smollm2_135m_layerskip.yaml", ["steps=100"]))
"""

from layerskip.training.config import TrainConfig, load_config
from layerskip.loading.adapter import merge_lora
from layerskip.training.trainer import train

__all__ = ["TrainConfig", "load_config", "merge_lora", "train"]
