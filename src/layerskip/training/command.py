"""`layerskip train` and `layerskip merge-lora`: the argparse wiring, shared by the main CLI and
`python -m layerskip.training` (which torchrun launches: `torchrun --nproc_per_node 2 -m layerskip.training ...`).

Importing this module is cheap: torch and the trainer load only when a command runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="the recipe, a YAML file (see recipes/ and docs/TRAINING.md)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe keys to override, dotted for sections: optim.lr=1e-4 lora.enabled=true "
                             "data.sources=notes.txt (values are read as YAML)")
    parser.set_defaults(run=run_train)


def add_merge_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True,
                        help="an adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--output", required=True, help="where to write the merged Hugging Face checkpoint")
    parser.add_argument("--model", default=None,
                        help="the base model (default: the adapter's base_model_name_or_path)")
    parser.set_defaults(run=run_merge_lora)


def add_training_commands(commands: Any) -> None:
    """Add `train` and `merge-lora` to the main CLI's subcommands."""
    add_train_arguments(commands.add_parser(
        "train", help="LayerSkip training: layer dropout, early-exit loss, curricula; full or LoRA",
        description="Continual pretraining or finetuning with layer dropout and the early-exit loss "
                    "(docs/TRAINING.md). Under torchrun, one process per device (FSDP2)."))
    add_merge_lora_arguments(commands.add_parser(
        "merge-lora", help="merge a LoRA adapter into its base model: a full checkpoint",
        description="Fold a LoRA adapter (ours or peft's) into the base model's weights and write a "
                    "Hugging Face checkpoint that `layerskip generate --model` loads."))


def run_train(args: argparse.Namespace) -> int:
    from layerskip.training import load_config, train

    config = load_config(args.config, args.overrides)
    if config.draft_adapter.enabled:
        from layerskip.training.draft_adapter import train_draft_adapter

        print(train_draft_adapter(config))
    else:
        print(train(config))
    return 0


def run_merge_lora(args: argparse.Namespace) -> int:
    from pathlib import Path

    from layerskip.loading import resolve_model_folder
    from layerskip.training.checkpoint import write_merged_checkpoint
    from layerskip.loading.adapter import read_adapter

    adapter_config, _ = read_adapter(args.adapter)
    base = args.model or adapter_config.get("base_model_name_or_path")
    write_merged_checkpoint(resolve_model_folder(base), Path(args.adapter), Path(args.output))
    print(args.output)
    return 0
