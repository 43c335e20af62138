"""The training recipe: nested dataclasses read from YAML, with `section.key=value` overrides.

Every key is checked: an unknown key, a value of the wrong type or out of range is a LayerSkipError
that names the key (and, for a typo, the closest valid key), before any model or data is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, Union

import yaml

from layerskip.errors import LayerSkipError
from layerskip.generation.config import MAX_DRAFT_CANDIDATES

LAYER_SHAPES = ("exp", "linear", "uniform")
STEP_SHAPES = ("constant", "exp")
EXIT_SCALES = ("sum_l", "l", "inv_l", "uniform")
CURRICULA = ("rotational", "gradual", "all", "last", "fixed")
PRECISIONS = ("bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
ADAPTER_KINDS = ("layer", "mlp")  # model/draft_adapter.py (not imported: reading a recipe loads no torch)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class DataSource:
    """One source of training text: a file, a folder, a JSONL file, a `datasets` dataset, or the model's own
    replies to a file of prompts."""

    path: str | None = None  # a text/code file (.gz read transparently), a folder, or a .jsonl file
    glob: str = "**/*"  # in a folder: the files to read (binary and non-UTF-8 files are skipped)
    field: str = "text"  # JSONL, datasets, self_generated: the text field (`input_ids`: pre-tokenised records)
    dataset: str | None = None  # a `datasets` name (from its cache when offline) or a save_to_disk folder
    name: str | None = None  # the dataset's configuration
    split: str = "train"
    self_generated: str | None = None  # a JSONL file of prompts: documents are the model's chat replies to them
    max_new_tokens: int = 256  # self_generated: the longest reply
    temperature: float = 0.6  # self_generated: sampling temperature (0: greedy)
    top_p: float = 0.9  # self_generated: nucleus sampling
    seed: int = 0  # self_generated: sampling seed
    max_tokens: int = 0  # keep at most this many tokens of the source (whole documents; folders then read
    #                     their files in a seeded shuffled order, so the cut is not alphabetical); 0: all


@dataclasses.dataclass
class DataConfig:
    sources: list[DataSource] = dataclasses.field(default_factory=list)
    seq_len: int = 512  # tokens per packed training sequence
    batch_size: int = 8  # sequences per micro-batch on each rank
    add_bos: bool = True  # put the tokenizer's BOS token before each document (text sources)
    add_eos: bool = True  # and an end token after it:
    eos_token: str | None = None  # that token, when not the tokenizer's EOS (e.g. "<|endoftext|>")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0  # applied to matrices only, never to norms or biases
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100  # linear warm-up from 0, then cosine decay
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclasses.dataclass
class LayerDropoutConfig:
    p_max: float = 0.1  # p(l, t) = S(t) * D(l) * p_max
    layer_shape: str = "exp"  # D(l): exp (paper), linear, uniform
    step_shape: str = "constant"  # S(t): constant (continual pretraining, finetuning), exp (from scratch)


@dataclasses.dataclass
class EarlyExitConfig:
    scale: str = "sum_l"  # e(l) shape: sum_l (paper), l, inv_l, uniform
    e_scale: float = 0.1
    curriculum: str = "rotational"  # rotational, gradual, all (every exit every step), last (no early exits),
    #                                 fixed (the exits listed in `exits`, at every step)
    exits: list[int] = dataclasses.field(default_factory=list)  # fixed: exit layers E, as in `--exit_layer E`
    rotation: int = 8  # rotational: every R-th layer is an exit, shifted by one layer each step
    gradual_interval: int = 0  # gradual: steps between enabling one more exit; 0 means steps / (2 L)
    distill_weight: float = 0.0  # weight of KL(original model's final logits || trained final logits)
    exit_distill: float = 0.0  # a: each early exit's loss is (1 - a) CE(labels) + a KL(original final || exit)
    loss_chunk_rows: int = 1024  # head + loss over this many positions at a time (bounds logits memory); 0: all


@dataclasses.dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))
    merge_at_end: bool = True  # also write a full merged checkpoint at the end


@dataclasses.dataclass
class DraftAdapterTrainConfig:
    """Train only a draft adapter (model/draft_adapter.py), the model frozen: training/draft_adapter.py."""

    enabled: bool = False
    exit_layer: int = 4  # E: the adapter reads the states leaving layer E-1
    kind: str = "layer"  # layer (one decoder layer, its own KV cache) or mlp (one SwiGLU block)
    intermediate_size: int = 1536
    context: bool = True  # also read the previous position's final-layer state
    kl_weight: float = 1.0  # loss = CE(the model's greedy token) + kl_weight KL(final layer || draft)
    heldout_sequences: int = 16  # the data's last sequences, for held-out agreement
    num_speculations: int = 4  # stored with the adapter as its decoding defaults
    draft_confidence: float = 0.0
    draft_candidates: int = 1


@dataclasses.dataclass
class TrainConfig:
    model: str | None = None  # a model folder, .gguf file or hub id; None: the embedded base model smollm2-135m
    output_dir: str = "runs/layerskip"
    steps: int = 1000  # optimizer steps (T)
    seed: int = 42
    device: str = "auto"  # auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)
    precision: str = "bf16"  # bf16: float32 weights with bfloat16 autocast; fp32
    activation_checkpointing: bool = False  # recompute each layer in backward (less memory, ~30% more compute)
    compile: bool = False  # torch.compile each decoder layer: ~1.35x faster steps on CPU after a minute of compiling
    log_every: int = 10  # steps between console/CSV log lines
    save_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept in output_dir/checkpoints
    resume: bool = True  # continue from the newest checkpoint in output_dir when there is one
    draft_vocab: int = 0  # store the training data's N most frequent token ids with each checkpoint (layerskip.json)
    #                       for drafts that score only those (`generate --draft_vocab_size`); 0: none
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    layer_dropout: LayerDropoutConfig = dataclasses.field(default_factory=LayerDropoutConfig)
    early_exit: EarlyExitConfig = dataclasses.field(default_factory=EarlyExitConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    draft_adapter: DraftAdapterTrainConfig = dataclasses.field(default_factory=DraftAdapterTrainConfig)

    def validate(self) -> "TrainConfig":
        """Range and choice checks that types alone cannot express; returns self."""
        checks = [
            ("steps", self.steps >= 1, "at least 1"),
            ("device", self.device in DEVICES, f"one of {', '.join(DEVICES)}"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("log_every", self.log_every >= 1, "at least 1"),
            ("save_every", self.save_every >= 1, "at least 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "at least 1"),
            ("draft_vocab", self.draft_vocab >= 0, "at least 0"),
            ("data.sources", bool(self.data.sources), "at least one source (path or dataset)"),
            ("data.seq_len", self.data.seq_len >= 2, "at least 2"),
            ("data.batch_size", self.data.batch_size >= 1, "at least 1"),
            ("optim.lr", self.optim.lr > 0, "positive"),
            ("optim.betas", len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas),
             "two numbers in [0, 1)"),
            ("optim.warmup_steps", self.optim.warmup_steps >= 0, "at least 0"),
            ("optim.min_lr_ratio", 0 <= self.optim.min_lr_ratio <= 1, "in [0, 1]"),
            ("optim.grad_clip", self.optim.grad_clip >= 0, "at least 0"),
            ("optim.grad_accum", self.optim.grad_accum >= 1, "at least 1"),
            ("layer_dropout.p_max", 0 <= self.layer_dropout.p_max < 1, "in [0, 1)"),
            ("layer_dropout.layer_shape", self.layer_dropout.layer_shape in LAYER_SHAPES,
             f"one of {', '.join(LAYER_SHAPES)}"),
            ("layer_dropout.step_shape", self.layer_dropout.step_shape in STEP_SHAPES, f"one of {', '.join(STEP_SHAPES)}"),
            ("early_exit.scale", self.early_exit.scale in EXIT_SCALES, f"one of {', '.join(EXIT_SCALES)}"),
            ("early_exit.e_scale", self.early_exit.e_scale >= 0, "at least 0"),
            ("early_exit.curriculum", self.early_exit.curriculum in CURRICULA, f"one of {', '.join(CURRICULA)}"),
            ("early_exit.rotation", self.early_exit.rotation >= 1, "at least 1"),
            ("early_exit.gradual_interval", self.early_exit.gradual_interval >= 0, "at least 0"),
            ("early_exit.distill_weight", self.early_exit.distill_weight >= 0, "at least 0"),
            ("early_exit.exit_distill", 0 <= self.early_exit.exit_distill <= 1, "in [0, 1]"),
            ("early_exit.exits", self.early_exit.curriculum != "fixed" or bool(self.early_exit.exits),
             "a non-empty list of exit layers with curriculum fixed"),
            ("early_exit.loss_chunk_rows", self.early_exit.loss_chunk_rows >= 0, "at least 0"),
            ("lora.rank", self.lora.rank >= 1, "at least 1"),
            ("lora.alpha", self.lora.alpha > 0, "positive"),
            ("lora.dropout", 0 <= self.lora.dropout < 1, "in [0, 1)"),
            ("lora.targets", bool(self.lora.targets), "at least one module name"),
            ("draft_adapter.exit_layer", self.draft_adapter.exit_layer >= 1, "at least 1"),
            ("draft_adapter.kind", self.draft_adapter.kind in ADAPTER_KINDS, f"one of {', '.join(ADAPTER_KINDS)}"),
            ("draft_adapter.intermediate_size", self.draft_adapter.intermediate_size >= 1, "at least 1"),
            ("draft_adapter.kl_weight", self.draft_adapter.kl_weight >= 0, "at least 0"),
            ("draft_adapter.heldout_sequences", self.draft_adapter.heldout_sequences >= 1, "at least 1"),
            ("draft_adapter.num_speculations", self.draft_adapter.num_speculations >= 1, "at least 1"),
            ("draft_adapter.draft_confidence", 0 <= self.draft_adapter.draft_confidence < 1, "in [0, 1)"),
            ("draft_adapter.draft_candidates", 1 <= self.draft_adapter.draft_candidates <= MAX_DRAFT_CANDIDATES,
             f"in [1, {MAX_DRAFT_CANDIDATES}]"),
            ("draft_adapter.enabled", not (self.draft_adapter.enabled and self.lora.enabled),
             "false with lora.enabled: a draft adapter trains with the model frozen"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise LayerSkipError(f"config key '{key}' must be {expected}, got {_lookup(self, key)!r}")
        for index, source in enumerate(self.data.sources):
            if [source.path, source.dataset, source.self_generated].count(None) != 2:
                raise LayerSkipError(f"config key 'data.sources[{index}]' needs exactly one of 'path', 'dataset' "
                                     "or 'self_generated'")
            for key, ok, expected in [("max_new_tokens", source.max_new_tokens >= 1, "at least 1"),
                                      ("temperature", source.temperature >= 0, "at least 0"),
                                      ("top_p", 0 < source.top_p <= 1, "in (0, 1]"),
                                      ("max_tokens", source.max_tokens >= 0, "at least 0")]:
                if not ok:
                    raise LayerSkipError(f"config key 'data.sources[{index}].{key}' must be {expected}, "
                                         f"got {getattr(source, key)!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A validated recipe: the YAML file (if any), then each `dotted.key=value` override (values parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as error:
            raise LayerSkipError(f"cannot read the recipe {path}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise LayerSkipError(f"the recipe {path} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise LayerSkipError(f"the recipe {path} must be a mapping of keys to values")
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise LayerSkipError(f"override '{override}' must look like key=value (for example optim.lr=1e-4)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _assign(raw, key.split("."), value, key)
    return from_dict(TrainConfig, raw, "").validate()


def _assign(raw: dict[str, Any], parts: list[str], value: Any, key: str) -> None:
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise LayerSkipError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _lookup(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and values of the wrong type."""
    if not isinstance(raw, dict):
        raise LayerSkipError(f"config key '{prefix.rstrip('.') or '(top level)'}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise LayerSkipError(f"unknown config key '{prefix}{key}'{hint}")
    return cls(**{key: _convert(hints[key], value, f"{prefix}{key}") for key, value in raw.items()})


def _convert(kind: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = [arg for arg in args if arg is not type(None)]
        return _convert(kind, value, key)
    if dataclasses.is_dataclass(kind):
        if kind is DataSource and isinstance(value, str):
            value = {"path": value}
        return from_dict(kind, value, f"{key}.")
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # a single item where a list is expected: `data.sources=notes.txt`
        return [_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads 3e-5 (no dot) as a string
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a model or path that YAML read as a number
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise LayerSkipError(f"config key '{key}' must be {kind.__name__}, got {value!r}")


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
