"""From a model spec (embedded default, local folder, GGUF file, or hub id) to a ready model.

Every source is first turned into a Hugging Face checkpoint folder; one code path loads that folder.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from layerskip.distributed import start_distributed, world_size
from layerskip.errors import LayerSkipError
from layerskip.loading.adapter import adapter_base_model, is_adapter_folder, merge_lora
from layerskip.loading.default_model import (BASE_MODEL_ALIASES, LAYERSKIP_MODEL, base_model_folder,
                                             default_model_folder, default_model_name, layerskip_model_folder,
                                             shipped_draft_adapter)
from layerskip.loading.draft_adapter import NO_ADAPTER, is_draft_adapter_folder, named_draft_adapter, read_draft_adapter
from layerskip.loading.hf_folder import (build_model, eos_token_ids, generation_defaults, load_state_dict,
                                         read_config, stored_blocks)
from layerskip.loading.hub import looks_like_hub_id, resolve_hub_id
from layerskip.loading.tokenizer import Tokenizer
from layerskip.model import ModelConfig, Transformer
from layerskip.model.draft_adapter import DraftAdapter
from layerskip.model.kernels.prepare import CPU_KERNELS, QUANTIZE, KernelError, prepare, prepare_adapter
from layerskip.model.parallel import Shard, TensorParallel
from layerskip.model.static import CompileReport, enable_compiled_steps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KERNELS_ENV = "LAYERSKIP_CPU_KERNELS"  # forces the CPU kernel path for a whole run (tests, CI, benchmarks)
DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass
class LoadedModel:
    """A model with everything decoding needs to know about it."""

    model: Transformer
    tokenizer: Tokenizer | None
    eos_token_ids: list[int]
    defaults: dict[str, Any]
    name: str
    folder: Path                      # the HF checkpoint folder the weights came from
    adapter: Path | None = None       # a LoRA adapter merged into them on load
    tokenizer_error: str | None = None  # why the folder's tokenizer files could not be read (tokenizer is None)
    draft_adapter: DraftAdapter | None = None  # drafts at its exit layer read the exit states through it
    draft_adapter_path: Path | None = None
    compile_report: CompileReport | None = None  # what compile=True did (None: not asked)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def runtime_settings(self) -> dict[str, Any]:
        """How this model runs here, for reports: weight format, kernel path, compiled passes."""
        settings: dict[str, Any] = {"weight_format": self.model.weight_format, "cpu_kernels": self.model.kernel_path,
                                    "device": str(self.device)}
        if self.compile_report is not None:
            settings["compile"] = self.compile_report.as_dict()
        return settings


def resolve_model_folder(spec: str | None) -> Path:
    """The HF checkpoint folder behind a model spec (converting a GGUF file on first use)."""
    if spec is None:
        return default_model_folder()
    if spec == LAYERSKIP_MODEL:
        return layerskip_model_folder()
    if spec in BASE_MODEL_ALIASES:
        return base_model_folder()
    path = Path(spec).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            path = ggufs[0]
        else:
            return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise LayerSkipError(f"{spec} is not a model checkpoint: give a checkpoint folder, a .gguf file or a hub id")
        from layerskip.loading.gguf_file import convert_gguf

        return convert_gguf(path)
    if looks_like_hub_id(spec) and not spec.startswith((".", "/", "~")):
        return resolve_hub_id(spec)
    raise LayerSkipError(f"unknown model '{spec}': no such file or folder, and not a hub id (org/name); "
                         f"omit --model for the embedded default '{default_model_name()}'")


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise LayerSkipError(f"unknown device '{device}': choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise LayerSkipError("--device cuda was asked for, but CUDA is not available on this machine")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """float32 on CPU (fastest there), bfloat16 on CUDA, unless asked otherwise."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise LayerSkipError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_cpu_kernels(cpu_kernels: str | None) -> str:
    """The kernel path asked for: the argument, else the environment's, else "auto"."""
    source = "cpu_kernels"
    if cpu_kernels is None:
        cpu_kernels, source = os.environ.get(CPU_KERNELS_ENV) or "auto", CPU_KERNELS_ENV
    if cpu_kernels not in CPU_KERNELS:
        raise LayerSkipError(f"unknown {source} '{cpu_kernels}': choose one of {', '.join(CPU_KERNELS)}")
    return cpu_kernels


def resolve_draft_adapter(spec: str | None, model: str | None, folders: list[Path]) -> Path | None:
    """The draft adapter to attach: `spec` ("none": no adapter), else the one the model's layerskip.json names
    (`folders`: the model's, then a merged LoRA adapter's), else the package's for the embedded original."""
    if spec == NO_ADAPTER:
        return None
    if spec is not None:
        path = Path(spec).expanduser()
        if not is_draft_adapter_folder(path):
            raise LayerSkipError(f"--draft_adapter {spec} is not a draft adapter folder (it needs draft_adapter.json); "
                                 f"`{NO_ADAPTER}` drafts from the plain exit")
        return path
    for folder in reversed(folders):
        named = named_draft_adapter(folder, generation_defaults(folder))
        if named is not None:
            return named
    return shipped_draft_adapter(model)


def tensor_parallel(config: ModelConfig, device: torch.device,
                    adapter: Path | None) -> tuple[TensorParallel | None, torch.device]:
    """Under torchrun with several processes, this rank's slices of the model (model/parallel.py) and its device;
    else (None, device)."""
    if world_size() == 1:
        return None, device
    if adapter is not None:
        raise LayerSkipError(f"a LoRA adapter ({adapter}) is merged into whole weights, not into one rank's slices: "
                             "merge it into a checkpoint first (layerskip's training writes merged folders too)")
    context = start_distributed(device)
    atexit.register(context.close)
    try:
        shard = Shard.plan(config, context.rank, context.world_size)
    except ValueError as error:
        raise LayerSkipError(f"cannot split the model for tensor parallelism: {error}") from None
    return TensorParallel(shard, config), context.device


def load(model: str | None = None, *, dtype: str | None = None, device: str = "auto",
         cpu_kernels: str | None = None, quantize: str = "none", draft_adapter: str | None = None,
         compile: bool = False) -> LoadedModel:
    """Load a model for decoding. `model`: None for the embedded default, a folder (a checkpoint, or a LoRA
    adapter whose base model is then loaded and merged), a .gguf file, or a hub id.

    `cpu_kernels` (CPU): "native" (our row-invariant kernels), "packed" (oneDNN-prepacked float32), "plain"
    (torch's), or "auto": native where it builds, else the faster of the other two timed here; None reads
    $LAYERSKIP_CPU_KERNELS (default "auto"). `quantize`: the weights' format for decoding, weight-only and
    applied at load (the LM head included): "none", "bf16", "int8" (Q8_0 blocks) or "int4" (Q4_1 blocks); a
    GGUF file's blocks of that format are used as they are. `draft_adapter`: a draft adapter folder
    (model/draft_adapter.py), "none", or None for the one the model names (the embedded original's ships).
    `compile`: decoding passes as compiled static-shape graphs (model/static.py): CUDA graphs on a GPU; on the
    CPU kept only if faster than the eager path here (`compile_report` says)."""
    cpu_kernels = resolve_cpu_kernels(cpu_kernels)
    if quantize not in QUANTIZE:
        raise LayerSkipError(f"unknown quantize '{quantize}': choose one of {', '.join(QUANTIZE)}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder = resolve_model_folder(model)
    adapter = None
    if is_adapter_folder(folder):  # a LoRA adapter: its base model, with the adapter merged into the weights
        adapter, folder = folder, resolve_model_folder(adapter_base_model(folder))
    config = read_config(folder)
    parallel, torch_device = tensor_parallel(config, torch_device, adapter)
    shard = parallel.shard if parallel is not None else None
    state = load_state_dict(folder, shard, config.head_dim)
    if adapter is not None:
        state = merge_lora(state, adapter)
    network = build_model(shard.local_config(config) if shard else config, state, dtype=torch_dtype,
                          device=torch_device, folder=folder, parallel=parallel)
    try:
        prepare(network, cpu_kernels, QUANTIZE[quantize],
                None if adapter is not None else stored_blocks(folder, shard, config.head_dim))
    except KernelError as error:
        raise LayerSkipError(f"cannot load {model or default_model_name()} with quantize={quantize}, "
                             f"cpu_kernels={cpu_kernels}: {error}") from None
    try:  # a broken tokenizer matters only to text prompts: token-id prompts still decode
        tokenizer, tokenizer_error = Tokenizer.from_folder(folder), None
    except LayerSkipError as error:
        tokenizer, tokenizer_error = None, str(error)
    eos_ids = eos_token_ids(folder)
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    defaults = {**generation_defaults(folder), **(generation_defaults(adapter) if adapter is not None else {})}
    drafts_path = resolve_draft_adapter(draft_adapter, model, [folder] + ([adapter] if adapter else []))
    drafts = None
    if drafts_path is not None:
        drafts = read_draft_adapter(drafts_path, config, dtype=torch_dtype, device=torch_device)
        prepare_adapter(drafts, network)
        defaults = {**defaults, **generation_defaults(drafts_path)}
    try:
        network.set_draft_vocab(defaults.get("draft_vocab"))
    except ValueError as error:
        raise LayerSkipError(f"the stored decoding defaults of {adapter or folder} are broken: {error}") from None
    report = enable_compiled_steps(network) if compile else None
    return LoadedModel(model=network, tokenizer=tokenizer, eos_token_ids=eos_ids, defaults=defaults,
                       name=model or default_model_name(), folder=folder, adapter=adapter,
                       tokenizer_error=tokenizer_error, draft_adapter=drafts, draft_adapter_path=drafts_path,
                       compile_report=report)


__all__ = ["DTYPES", "LoadedModel", "load", "resolve_model_folder"]
