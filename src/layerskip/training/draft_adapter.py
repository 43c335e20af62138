"""Training a draft adapter (model/draft_adapter.py) with the model frozen: `layerskip train` with a recipe whose
`draft_adapter.enabled` is true (recipes/smollm2_135m_draft.yaml).

1. The data (usually the model's own replies, training/self_generated.py) is packed into sequences as for
   LayerSkip training.
2. The frozen model runs over each sequence once; the states leaving layer E-1, the final layer's states and
   the final layer's greedy token at every position are stored on disk (bfloat16 states, memory-mapped),
   resumably. Nothing later runs the model again: training costs the adapter and a head slice per token.
3. The draft vocabulary (the head slice drafts score) is ranked by how often the model's greedy token is each
   id on these sequences.
4. Only the adapter trains: cross-entropy to the model's greedy token (what greedy verification accepts) plus
   `kl_weight` x KL(final layer || draft) over the slice (what sampled verification accepts), from the exit
   state and, with `context`, the previous position's final state (what the first draft of a round sees).
5. Every `save_every` steps a checkpoint (adapter in float32, optimizer, schedule) is written, from which a
   rerun resumes bit-identically; at each epoch's end and at the last step the held-out agreement (the last
   `heldout_sequences` sequences) is logged. The result is an adapter folder that `--draft_adapter` loads,
   with the draft vocabulary and the recipe's decoding settings stored in it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import layerskip
from layerskip.loading import resolve_device
from layerskip.errors import LayerSkipError
from layerskip.loading.default_model import BASE_MODEL
from layerskip.loading.draft_adapter import save_draft_adapter
from layerskip.loading.hf_folder import atomic_folder, read_json
from layerskip.model import Transformer
from layerskip.model.draft_adapter import DraftAdapter, DraftAdapterConfig, previous_positions
from layerskip.training import checkpoint as ckpt
from layerskip.training.config import TrainConfig, dump_config
from layerskip.training.data import Preparation, cache_key, load_token_stream
from layerskip.training.trainer import CHECKPOINTS, METRICS, MetricsLog, autocast, frequent_tokens, lr_factor

STATES = "states"
ADAPTER = "draft_adapter"     # the result: <output_dir>/draft_adapter
CACHE_BATCH = 4               # sequences per pass of the frozen model while caching states
COLUMNS = ["step", "epochs", "lr", "loss", "ce", "kl", "agreement", "heldout_agreement", "heldout_plain_exit",
           "tokens_per_second"]


def bf16_bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to(torch.bfloat16).view(torch.int16).cpu().numpy()


def from_bf16_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits)).view(torch.bfloat16).float()


class StateCache:
    """The frozen model's states over every sequence [N, S]: exit states and final states [N, S, H] (bfloat16
    bits), and its greedy tokens [N, S] (int32), memory-mapped files filled in order, `done.json` counting
    the finished sequences; a different model, data, length or exit gets another folder."""

    def __init__(self, root: Path, key: dict[str, Any], count: int, seq_len: int, hidden: int):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = root / f"{STATES}-E{key['exit_layer']}-{digest}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = count
        shapes = {"exits": (count, seq_len, hidden), "finals": (count, seq_len, hidden), "targets": (count, seq_len)}
        fresh = not (self.folder / "done.json").is_file()
        self.arrays = {name: np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+" if fresh else "r+",
                                                        dtype=np.int32 if name == "targets" else np.int16,
                                                        shape=shape)
                       for name, shape in shapes.items()}
        if fresh:
            self._write_done(0)

    @property
    def done(self) -> int:
        return int(read_json(self.folder / "done.json")["sequences"])

    def _write_done(self, sequences: int) -> None:
        staging = self.folder / "done.json.tmp"
        staging.write_text(json.dumps({"sequences": sequences}))
        staging.replace(self.folder / "done.json")

    @torch.inference_mode()
    def fill(self, model: Transformer, sequences: np.ndarray, exit_layer: int, precision: Any) -> None:
        """Run the frozen model over the sequences not yet cached, a few at a time, under `precision` (an
        autocast context: bfloat16 is 2.4x faster on a 2-core Zen 5, and the states are stored in bfloat16
        anyway), with a progress bar."""
        start = self.done
        bar = tqdm(total=self.count, initial=start, desc="caching exit states", unit="seq", file=sys.stderr)
        for first in range(start, self.count, CACHE_BATCH):
            rows = slice(first, min(first + CACHE_BATCH, self.count))
            ids = torch.from_numpy(sequences[rows].astype(np.int64)).to(model.inv_freq.device)
            with precision:
                exits = model.forward_layers(model.embed(ids), 0, exit_layer)
                finals = model.forward_layers(exits, exit_layer, model.num_layers)
                greedy = model.head(finals).argmax(-1)
            self.arrays["exits"][rows] = bf16_bits(exits)
            self.arrays["finals"][rows] = bf16_bits(finals)
            self.arrays["targets"][rows] = greedy.int().cpu().numpy()
            for array in self.arrays.values():
                array.flush()
            self._write_done(rows.stop)
            bar.update(rows.stop - rows.start)
        bar.close()

    def batch(self, rows: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exit states, final states (float32 [B, S, H]) and greedy tokens (int64 [B, S]) of some sequences."""
        order = np.argsort(rows)  # memory-mapped reads in file order
        picked = np.asarray(rows)[order]
        inverse = torch.from_numpy(np.argsort(order))
        exits = from_bf16_bits(self.arrays["exits"][picked])[inverse]
        finals = from_bf16_bits(self.arrays["finals"][picked])[inverse]
        targets = torch.from_numpy(self.arrays["targets"][picked].astype(np.int64))[inverse]
        return exits.to(device), finals.to(device), targets.to(device)


class DraftLoss:
    """Cross-entropy to the model's greedy token and KL to its distribution, both over the draft slice of the
    frozen shared head; also the top-1 agreement (over the slice) with the greedy token over the full head."""

    def __init__(self, model: Transformer, vocab: torch.Tensor | None, kl_weight: float):
        self.norm = model.norm
        self.weight = model.lm_head.weight.detach()
        self.ids = vocab
        if vocab is not None:
            self.weight = self.weight[vocab]
            self.slot = torch.full((model.config.vocab_size,), -100, dtype=torch.long, device=vocab.device)
            self.slot[vocab] = torch.arange(len(vocab), device=vocab.device)
        self.kl_weight = kl_weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(hidden), self.weight).float()

    def labels(self, targets: torch.Tensor) -> torch.Tensor:
        """The greedy tokens as indices into the slice (-100, ignored, where the slice lacks them), flattened."""
        return targets.flatten() if self.ids is None else self.slot[targets.flatten()]

    def __call__(self, drafted: torch.Tensor, finals: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.logits(drafted).flatten(0, 1)
        labels = self.labels(targets)
        ce = F.cross_entropy(logits, labels, ignore_index=-100)
        loss, metrics = ce, {"ce": ce.detach()}
        if self.kl_weight:
            with torch.no_grad():
                teacher = torch.log_softmax(self.logits(finals).flatten(0, 1), -1)
            kl = F.kl_div(torch.log_softmax(logits, -1), teacher, log_target=True, reduction="batchmean")
            loss = loss + self.kl_weight * kl
            metrics["kl"] = kl.detach()
        metrics["agreement"] = self.agreement(logits.detach(), labels)
        return loss, metrics

    @staticmethod
    def agreement(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(-1) == labels).float().mean()


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator)


class DraftRun:
    """One draft adapter training run: data, state cache, adapter, optimizer, and where it stands."""

    def __init__(self, config: TrainConfig):
        self.config, settings = config, config.draft_adapter
        self.output = Path(config.output_dir)
        self.device = resolve_device(config.device)
        model_spec = config.model or BASE_MODEL
        loaded = layerskip.load(model_spec, dtype="float32", device=str(self.device.type), cpu_kernels="plain",
                                draft_adapter="none")
        self.model = loaded.model.requires_grad_(False)
        model_config = self.model.config
        self.adapter_config = DraftAdapterConfig(exit_layer=settings.exit_layer, hidden_size=model_config.hidden_size,
                                                 kind=settings.kind, intermediate_size=settings.intermediate_size,
                                                 context=settings.context)
        self.adapter_config.check_fits(model_config, "draft_adapter.exit_layer in the recipe")
        preparation = Preparation(model=model_spec, cache_dir=self.output / "data", device=self.device.type)
        hf_tokenizer = loaded.tokenizer and loaded.tokenizer.hf
        tokens = load_token_stream(config.data, hf_tokenizer, model_config.vocab_size,
                                   self.output / "data", is_main=True, barrier=lambda: None, preparation=preparation)
        seq_len = config.data.seq_len
        count = len(tokens) // seq_len
        if count <= settings.heldout_sequences:
            raise LayerSkipError(f"the training data holds {count} sequences of data.seq_len {seq_len}, not more than "
                                 f"draft_adapter.heldout_sequences = {settings.heldout_sequences}: add data")
        sequences = np.asarray(tokens[:count * seq_len]).reshape(count, seq_len)
        key = {"model": model_spec, "data": cache_key(config.data, hf_tokenizer, model_spec), "seq_len": seq_len,
               "exit_layer": settings.exit_layer}
        self.states = StateCache(self.output / "data", key, count, seq_len, model_config.hidden_size)
        self.states.fill(self.model, sequences, settings.exit_layer, autocast(config, self.device))
        self.train_count = count - settings.heldout_sequences
        greedy = np.asarray(self.states.arrays["targets"][:self.train_count]).reshape(-1)
        self.draft_vocab = frequent_tokens(greedy, config.draft_vocab) if config.draft_vocab else None
        vocab = None if self.draft_vocab is None else torch.tensor(self.draft_vocab, device=self.device)
        self.loss = DraftLoss(self.model, vocab, settings.kl_weight)
        torch.manual_seed(config.seed)
        self.adapter = DraftAdapter(self.adapter_config, model_config).to(self.device).train()
        optim = config.optim
        matrices = [p for p in self.adapter.parameters() if p.ndim >= 2]
        vectors = [p for p in self.adapter.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": optim.weight_decay},
                                            {"params": vectors, "weight_decay": 0.0}],
                                           lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(
            step, warmup=optim.warmup_steps, total=config.steps, min_ratio=optim.min_lr_ratio))
        self.step = 0
        self.plain_exit_agreement: float | None = None
        self.checkpoint_root = self.output / CHECKPOINTS
        latest = ckpt.latest_checkpoint(self.checkpoint_root)
        if latest is not None:
            if not config.resume:
                raise LayerSkipError(f"{self.output} already has checkpoints ({latest.name}): choose another "
                                     "output_dir, or resume=true to continue from them")
            self._restore(latest)

    def _restore(self, folder: Path) -> None:
        state = ckpt.load_training_state(folder)
        self.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        ckpt.set_rng_state(state["rng"])
        print(f"layerskip: resuming from {folder} at step {self.step}", file=sys.stderr)

    def forward(self, exits: torch.Tensor, finals: torch.Tensor) -> torch.Tensor:
        context = previous_positions(finals) if self.adapter_config.context else None
        cos, sin = (table.clone() for table in self.model.rope(0, exits.shape[1], exits.dtype))  # not inference tensors
        return self.adapter(exits, context, cos, sin)

    def batch_rows(self, step: int) -> list[int]:
        """The training sequences of a step: consecutive slots of each epoch's seeded order."""
        size = self.config.data.batch_size
        positions = range(step * size, (step + 1) * size)
        orders = {epoch: epoch_order(self.train_count, self.config.seed, epoch)
                  for epoch in {position // self.train_count for position in positions}}
        return [int(orders[position // self.train_count][position % self.train_count]) for position in positions]

    @torch.no_grad()
    def heldout(self) -> tuple[float, float]:
        """Held-out agreement of the adapter's first drafts, and of the plain exit's (the adapter's starting point,
        measured once: it does not train)."""
        self.adapter.eval()
        agree, plain, rows = 0.0, 0.0, list(range(self.train_count, self.states.count))
        for first in range(0, len(rows), self.config.data.batch_size):
            exits, finals, targets = self.states.batch(rows[first:first + self.config.data.batch_size], self.device)
            labels = self.loss.labels(targets)
            with autocast(self.config, self.device):
                drafted = self.forward(exits, finals)
            share = len(labels) / (len(rows) * targets.shape[1])
            agree += share * float(self.loss.agreement(self.loss.logits(drafted).flatten(0, 1), labels))
            if self.plain_exit_agreement is None:
                plain += share * float(self.loss.agreement(self.loss.logits(exits).flatten(0, 1), labels))
        self.adapter.train()
        if self.plain_exit_agreement is None:
            self.plain_exit_agreement = plain
        return agree, self.plain_exit_agreement

    def train(self) -> Path:
        config = self.config
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / ckpt.RECIPE).write_text(dump_config(config))
        log = MetricsLog(self.output / METRICS, COLUMNS, resume_step=self.step)
        size = config.data.batch_size
        bar = tqdm(total=config.steps, initial=self.step, desc="training the draft adapter", unit="step",
                   file=sys.stderr, dynamic_ncols=True)
        sums: dict[str, float] = {}
        started, tokens = time.perf_counter(), 0
        while self.step < config.steps:
            rows = self.batch_rows(self.step)
            exits, finals, targets = self.states.batch(rows, self.device)
            with autocast(config, self.device):
                loss, metrics = self.loss(self.forward(exits, finals), finals, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), config.optim.grad_clip or float("inf"))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            tokens += targets.numel()
            for name, value in {"loss": loss.detach(), **metrics}.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            bar.update(1)
            epoch_end = self.step * size // self.train_count > (self.step - 1) * size // self.train_count \
                or self.step == config.steps  # this step finished an epoch (or the run)
            if self.step % config.log_every == 0 or epoch_end:
                count = self.step % config.log_every or config.log_every
                row = {"step": self.step, "epochs": self.step * size / self.train_count,
                       "lr": self.scheduler.get_last_lr()[0],
                       **{name: sums.get(name, math.nan) / count for name in ("loss", "ce", "kl", "agreement")},
                       "heldout_agreement": math.nan, "heldout_plain_exit": math.nan,
                       "tokens_per_second": tokens / (time.perf_counter() - started)}
                if epoch_end:
                    row["heldout_agreement"], row["heldout_plain_exit"] = self.heldout()
                log.write(row)
                bar.write(f"step {self.step} ({row['epochs']:.2f} epochs): loss {row['loss']:.4f} agreement {row['agreement']:.1%}"
                          + (f" | held out {row['heldout_agreement']:.1%} (plain exit {row['heldout_plain_exit']:.1%})"
                             if epoch_end else ""))
                sums, started, tokens = {}, time.perf_counter(), 0
            if self.step % config.save_every == 0 or self.step == config.steps:
                self.save()
        bar.close()
        return self.export()

    def defaults(self) -> dict[str, Any]:
        """The decoding settings stored with the adapter: its exit, the recipe's drafts per round, confidence stop
        and candidates, the ranked draft vocabulary (a sweep with `--save_defaults` may later choose others)."""
        settings = self.config.draft_adapter
        stored: dict[str, Any] = {"exit_layer": settings.exit_layer, "num_speculations": settings.num_speculations,
                                  "draft_confidence": settings.draft_confidence,
                                  "draft_candidates": settings.draft_candidates}
        if self.draft_vocab is not None:
            stored.update(draft_vocab=self.draft_vocab, draft_vocab_size=len(self.draft_vocab))
        return stored

    def save(self) -> None:
        target = ckpt.step_folder(self.checkpoint_root, self.step)
        with atomic_folder(target) as staging:
            save_draft_adapter(self.adapter, staging / ADAPTER, defaults=self.defaults(), dtype=torch.float32,
                               base_model=self.config.model or BASE_MODEL)
            ckpt.save_training_state(staging, {
                "step": self.step, "adapter": self.adapter.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state()})
            (staging / ckpt.RECIPE).write_text(dump_config(self.config))
        ckpt.prune_checkpoints(self.checkpoint_root, self.config.keep_checkpoints)

    def export(self) -> Path:
        """<output_dir>/draft_adapter: the adapter in bfloat16 with its decoding settings."""
        target = self.output / ADAPTER
        save_draft_adapter(self.adapter, target, defaults=self.defaults(), base_model=self.config.model or BASE_MODEL)
        return target


def train_draft_adapter(config: TrainConfig) -> Path:
    """Train a draft adapter as the recipe's `draft_adapter` section says; returns the adapter folder."""
    config.validate()
    return DraftRun(config).train()
