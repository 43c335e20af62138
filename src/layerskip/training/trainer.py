"""The training loop: LayerSkip continual pretraining or finetuning, full or LoRA, on one process or under torchrun.

One optimizer step t:
  1. the curriculum names the exits in the loss, weighted e~(t, l) (early_exit_loss.py);
  2. layer dropout draws the keep/skip matrix for the step's global batch (layer_dropout.py);
  3. each of the grad_accum micro-batches runs forward (bfloat16 autocast) and backward;
  4. gradients are clipped, AdamW steps, the warm-up + cosine schedule and the curriculum advance.
Every log_every steps a line goes to the console and a row to <output_dir>/metrics.csv (each exit's
cross-entropy, averaged over the steps where it was in the loss); every save_every steps and at the end
a checkpoint is written (checkpoint.py), from which a rerun with the same output_dir resumes exactly.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

from layerskip.errors import LayerSkipError
from layerskip.loading import resolve_model_folder
from layerskip.loading.adapter import read_adapter
from layerskip.loading.default_model import BASE_MODEL
from layerskip.loading.hf_folder import (GENERATION_DEFAULTS_FILE, atomic_folder, build_model, load_state_dict,
                                         read_config, save_hf_weights)
from layerskip.loading.tokenizer import Tokenizer
from layerskip.model import Transformer
from layerskip.training import checkpoint as ckpt
from layerskip.training.config import TrainConfig, dump_config
from layerskip.training.curriculum import Curriculum, make_curriculum
from layerskip.training.data import PackedSequences, Preparation, load_token_stream
from layerskip.training.distributed import DistributedContext, full_tensor, setup_distributed, shard
from layerskip.training.early_exit_loss import exit_scales, exit_weights
from layerskip.training.layer_dropout import LayerDropout
from layerskip.training.lora import add_lora, is_lora_parameter, save_adapter, store_frozen_weights_as
from layerskip.training.model import Teacher, TrainingModel

CHECKPOINTS = "checkpoints"
MERGED = "merged"
METRICS = "metrics.csv"
STATE_OPTIONS = StateDictOptions(full_state_dict=True, cpu_offload=True)


def train(config: TrainConfig) -> Path:
    """Train as the recipe says; returns the folder that `layerskip generate --model` loads
    (the last checkpoint, or with LoRA the merged model, or the adapter when lora.merge_at_end is off)."""
    config.validate()
    context = setup_distributed(config.device)
    try:
        return Run(config, context).train()
    finally:
        context.close()


def frequent_tokens(tokens: np.ndarray, count: int) -> list[int]:
    """The `count` most frequent token ids of a token stream, most frequent first (ties: lower id first)."""
    frequency = np.bincount(np.asarray(tokens, dtype=np.int64))
    order = np.lexsort((np.arange(len(frequency)), -frequency))
    return [int(token) for token in order[:count] if frequency[token] > 0]


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then a cosine down to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast(config: TrainConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


class Run:
    """One training run: the model, data, optimizer and schedule, and where it stands."""

    def __init__(self, config: TrainConfig, context: DistributedContext):
        self.config = config
        self.context = context
        self.output = Path(config.output_dir)
        self.checkpoint_root = self.output / CHECKPOINTS
        if config.precision == "bf16" and context.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise LayerSkipError("precision bf16 was asked for, but this GPU has no bfloat16: use precision=fp32")
        self.resume_from = ckpt.latest_checkpoint(self.checkpoint_root)
        if self.resume_from is not None and not config.resume:
            raise LayerSkipError(f"{self.output} already has checkpoints ({self.resume_from.name}): "
                                 "choose another output_dir, or resume=true to continue from them")
        self.source_folder = resolve_model_folder(config.model or BASE_MODEL)
        self.model_config = read_config(self.source_folder)
        tokenizer = Tokenizer.from_folder(self.source_folder)
        preparation = Preparation(model=config.model or BASE_MODEL, cache_dir=self.output / "data", device=context.device.type)
        tokens = load_token_stream(config.data, tokenizer and tokenizer.hf, self.model_config.vocab_size,
                                   self.output / "data", is_main=context.is_main, barrier=context.barrier,
                                   preparation=preparation)
        self.data = PackedSequences(tokens, config.data.seq_len, config.seed)
        self.draft_vocab = frequent_tokens(tokens, config.draft_vocab) if config.draft_vocab else None
        self.model = self._load_model()
        self.num_layers = self.model.num_layers
        teacher = None
        if config.early_exit.distill_weight > 0 or config.early_exit.exit_distill > 0:
            teacher = Teacher(self.model if config.lora.enabled else self._frozen_original())
        self.module = TrainingModel(self.model, loss_chunk_rows=config.early_exit.loss_chunk_rows,
                                    activation_checkpointing=config.activation_checkpointing,
                                    teacher=teacher, distill_weight=config.early_exit.distill_weight,
                                    exit_distill=config.early_exit.exit_distill)
        if context.sharded:
            shard(self.module, self.model.layers)
        if config.compile:  # in place, after sharding: parameter names (checkpoints, adapters) are unchanged
            for layer in self.model.layers:
                layer.compile()
        torch.manual_seed(config.seed + context.rank)  # after the (rank-identical) LoRA initialisation
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(
            step, warmup=config.optim.warmup_steps, total=config.steps, min_ratio=config.optim.min_lr_ratio))
        self.dropout = LayerDropout(self.num_layers, config.layer_dropout.p_max,
                                    layer_shape_name=config.layer_dropout.layer_shape,
                                    step_shape_name=config.layer_dropout.step_shape, total_steps=config.steps,
                                    seed=config.seed)
        self.curriculum: Curriculum = make_curriculum(
            config.early_exit.curriculum, self.num_layers, rotation=config.early_exit.rotation,
            gradual_interval=config.early_exit.gradual_interval, total_steps=config.steps,
            exits=config.early_exit.exits)
        self.scales = exit_scales(self.num_layers, config.early_exit.scale, config.early_exit.e_scale)
        self.step = 0
        self.samples_seen = 0
        if self.resume_from is not None:
            self._restore(self.resume_from)

    # ---- setup -------------------------------------------------------------------------------------

    def _load_model(self) -> Transformer:
        config = self.config
        full_resume = self.resume_from is not None and not config.lora.enabled
        weights = load_state_dict(self.resume_from if full_resume else self.source_folder)
        model = build_model(self.model_config, weights, dtype=torch.float32, device=self.context.device).train()
        if config.lora.enabled:
            torch.manual_seed(config.seed)  # the same adapter initialisation on every rank
            add_lora(model, rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                     targets=config.lora.targets)
            if config.precision == "bf16" and self.context.world_size == 1:  # FSDP wants one dtype per group
                store_frozen_weights_as(model, torch.bfloat16)
            if self.resume_from is not None:
                _, tensors = read_adapter(self.resume_from)
                missing = {n for n, _ in model.named_parameters() if is_lora_parameter(n)} - set(tensors)
                if missing:
                    raise LayerSkipError(f"the checkpoint {self.resume_from} does not match lora.rank/targets: "
                                         f"it lacks {sorted(missing)[0]}")
                model.load_state_dict({name: t.to(self.context.device) for name, t in tensors.items()}, strict=False)
        return model

    def _frozen_original(self) -> Transformer:
        original = build_model(self.model_config, load_state_dict(self.source_folder), dtype=torch.float32,
                               device=self.context.device)
        return original.requires_grad_(False)

    def _optimizer(self) -> torch.optim.Optimizer:
        trainable = [parameter for parameter in self.module.parameters() if parameter.requires_grad]
        optim = self.config.optim
        groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": optim.weight_decay},
                  {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=tuple(optim.betas),
                                 eps=optim.eps)

    def _restore(self, folder: Path) -> None:
        state = ckpt.load_training_state(folder)
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        if len(state["rng"]) == self.context.world_size:
            ckpt.set_rng_state(state["rng"][self.context.rank])
        elif self.context.is_main:
            print(f"layerskip: resuming on {self.context.world_size} processes from a checkpoint of "
                  f"{len(state['rng'])}: random states are reseeded", file=sys.stderr)
        if self.context.is_main:
            print(f"layerskip: resuming from {folder} at step {self.step}", file=sys.stderr)

    # ---- the loop ----------------------------------------------------------------------------------

    def train(self) -> Path:
        config, context = self.config, self.context
        batch, accum, world = config.data.batch_size, config.optim.grad_accum, context.world_size
        global_batch = batch * accum * world
        tokens_per_step = global_batch * config.data.seq_len
        log = MetricsLog(self.output / METRICS, metrics_columns(self.num_layers), resume_step=self.step) \
            if context.is_main else None
        if context.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / ckpt.RECIPE).write_text(dump_config(config))
        bar = tqdm(total=config.steps, initial=self.step, desc="training", unit="step", file=sys.stderr,
                   disable=not context.is_main, dynamic_ncols=True)
        window = Window(self.num_layers, context.device)
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        while self.step < config.steps:
            weights = exit_weights(self.scales, self.curriculum.enabled_exits()).tolist()
            keep = self.dropout.keep_masks(self.step, global_batch)
            for micro in range(accum):
                first = micro * world * batch  # this micro-batch's columns in the step's global batch
                local = slice(first + context.rank * batch, first + (context.rank + 1) * batch)
                inputs, labels = self.data.batch(self.samples_seen + local.start, batch)
                must_run = keep[:, first:first + world * batch].any(dim=1).tolist() if context.sharded else None
                if context.sharded:
                    self.module.set_requires_gradient_sync(micro == accum - 1)
                with autocast(config, context.device):
                    loss, metrics = self.module(inputs.to(context.device), labels.to(context.device),
                                                keep[:, local].tolist(), weights, must_run)
                (loss / accum).backward()
                window.add(loss.detach(), metrics)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.optim.grad_clip or float("inf"))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.curriculum.step()
            self.step += 1
            self.samples_seen += global_batch
            window.end_step(full_tensor(grad_norm), tokens_per_step)
            bar.update(1)
            if self.step % config.log_every == 0 or self.step == config.steps:
                row = window.flush(context, step=self.step, samples=self.samples_seen,
                                   lr=self.scheduler.get_last_lr()[0])
                if log is not None:
                    log.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
                    bar.write(format_row(row, self.num_layers))
            if self.step % config.save_every == 0 or self.step == config.steps:
                self.save()
        bar.close()
        return self.export()

    # ---- checkpoints -------------------------------------------------------------------------------

    def save(self) -> Path:
        """Write the checkpoint of the current step (every rank takes part in gathering the state)."""
        config, context = self.config, self.context
        lora = config.lora.enabled
        weights = {name.removeprefix("model."): full_tensor(parameter)
                   for name, parameter in self.module.named_parameters()
                   if not lora or is_lora_parameter(name)}
        optimizer_state = get_optimizer_state_dict(self.module, self.optimizer, options=STATE_OPTIONS)
        rng_states = context.all_gather_object(ckpt.rng_state())
        target = ckpt.step_folder(self.checkpoint_root, self.step)
        if context.is_main:
            with atomic_folder(target) as staging:
                if lora:
                    save_adapter(staging, weights, rank=config.lora.rank, alpha=config.lora.alpha,
                                 dropout=config.lora.dropout, targets=config.lora.targets,
                                 base_model=config.model or BASE_MODEL)
                else:
                    ckpt.copy_model_files(self.source_folder, staging)
                    save_hf_weights(staging, weights, tied=self.model_config.tie_word_embeddings)
                ckpt.save_training_state(staging, {
                    "step": self.step, "samples_seen": self.samples_seen, "optimizer": optimizer_state,
                    "scheduler": self.scheduler.state_dict(), "curriculum": self.curriculum.state_dict(),
                    "rng": rng_states})
                (staging / ckpt.RECIPE).write_text(dump_config(config))
                if self.draft_vocab is not None:
                    (staging / GENERATION_DEFAULTS_FILE).write_text(json.dumps({"draft_vocab": self.draft_vocab}))
            ckpt.prune_checkpoints(self.checkpoint_root, config.keep_checkpoints)
        context.barrier()
        return target

    def export(self) -> Path:
        """The folder to load the result from; with LoRA and merge_at_end, a full model merged from the adapter."""
        latest = ckpt.step_folder(self.checkpoint_root, self.step)
        if not (self.config.lora.enabled and self.config.lora.merge_at_end):
            return latest
        target = self.output / MERGED
        if self.context.is_main:
            ckpt.write_merged_checkpoint(self.source_folder, latest, target)
        self.context.barrier()
        return target


class Window:
    """Losses and timing accumulated between two log lines (per-exit sums and counts stay on the device)."""

    def __init__(self, num_layers: int, device: torch.device):
        self.num_layers = num_layers
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(2 * self.num_layers + 2, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(2 * self.num_layers + 2, dtype=torch.float64, device=self.device)
        self.grad_norms: list[float] = []
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, metrics: torch.Tensor) -> None:
        values = torch.cat([loss.reshape(1).double(), metrics.double()])
        present = ~values.isnan()
        self.sums += torch.where(present, values, 0.0)
        self.counts += present

    def end_step(self, grad_norm: torch.Tensor, tokens: int) -> None:
        self.grad_norms.append(float(grad_norm))
        self.tokens += tokens

    def flush(self, context: DistributedContext, *, step: int, samples: int, lr: float) -> dict[str, Any]:
        totals = context.all_reduce_sum(torch.stack([self.sums, self.counts])).cpu()
        means = (totals[0] / totals[1]).tolist()  # NaN where an exit was never in the loss
        seconds = time.perf_counter() - self.started
        row = {"step": step, "samples": samples, "lr": lr, "loss": means[0],
               "grad_norm": sum(self.grad_norms) / len(self.grad_norms),
               "tokens_per_second": self.tokens / seconds, "distill_kl": means[-1],
               **{exit_column(layer): means[1 + layer] for layer in range(self.num_layers)},
               **{agreement_column(layer): means[1 + self.num_layers + layer] for layer in range(self.num_layers)}}
        self._reset()
        return row


def exit_column(layer: int) -> str:
    """The CSV column of the exit after layer index `layer`: named by the exit layer E = layer + 1 of `generate`."""
    return f"ce_e{layer + 1}"


def agreement_column(layer: int) -> str:
    """The CSV column of that exit's top-1 agreement with the original model's final layer."""
    return f"agree_e{layer + 1}"


def format_row(row: dict[str, Any], num_layers: int) -> str:
    exits = " ".join(f"{row[exit_column(layer)]:.3f}" if not math.isnan(row[exit_column(layer)]) else "-"
                     for layer in range(num_layers))
    kl = "" if math.isnan(row["distill_kl"]) else f" kl {row['distill_kl']:.4f}"
    agreements = ", ".join(f"E{layer + 1} {row[agreement_column(layer)]:.1%}" for layer in range(num_layers - 1)
                           if not math.isnan(row[agreement_column(layer)]))
    return (f"step {row['step']}: loss {row['loss']:.4f}{kl} lr {row['lr']:.2e} grad_norm {row['grad_norm']:.3f} "
            f"{row['tokens_per_second']:.0f} tok/s | exits E=1..{num_layers}: {exits}"
            + (f" | agreement {agreements}" if agreements else ""))


def metrics_columns(num_layers: int) -> list[str]:
    return ["step", "samples", "lr", "loss", "grad_norm", "tokens_per_second", "distill_kl",
            *(exit_column(layer) for layer in range(num_layers)), *(agreement_column(layer) for layer in range(num_layers))]


class MetricsLog:
    """metrics.csv, one row per log step; on resume, rows past the resumed step (a run that went further
    than its last checkpoint) are dropped so the file tells one continuous story."""

    def __init__(self, path: Path, columns: list[str], *, resume_step: int):
        self.path = path
        self.columns = columns
        kept: list[dict[str, str]] = []
        if path.is_file() and resume_step > 0:
            with path.open(newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, self.columns)
            writer.writeheader()
            writer.writerows(kept)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, self.columns).writerow({key: repr(row[key]) if isinstance(row[key], float)
                                                           else row[key] for key in self.columns})
