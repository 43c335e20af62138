"""Training data: documents from files, folders, JSONL or `datasets`, tokenised once, packed into sequences.

Documents are tokenised (with BOS/end tokens around each), concatenated into one token stream and cut
into sequences of seq_len + 1 tokens (inputs and next-token labels). The stream is cached in the run's
folder, keyed by the sources, their files' sizes and times, and the tokenizer.

The order is a pure function of (seed, position): global sample s is sequence perm_e[s mod N] of epoch
e = s // N, with perm_e drawn from (seed, e). A step takes the next global batch of positions and each
rank its slice, so resuming needs only the number of samples consumed, and a run on one process with
gradient accumulation sees the same samples as the same global batch split over ranks.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from layerskip.errors import LayerSkipError
from layerskip.jsonl import read_objects
from layerskip.training.config import DataConfig, DataSource

Document = str | list[int]  # text, or token ids given pre-tokenised
TOKENIZE_BATCH = 256


def source_files(source: DataSource) -> list[Path]:
    """The files a path source reads: the file itself, or the folder's files matching its glob."""
    path = Path(source.path or "").expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LayerSkipError(f"data source '{source.path}' does not exist")
    files = sorted(p for p in path.glob(source.glob) if p.is_file())
    if not files:
        raise LayerSkipError(f"data source '{source.path}' has no files matching '{source.glob}'")
    if source.max_tokens:  # only part of the folder is read: a seeded sample of its files, not its first ones
        random.Random(0).shuffle(files)
    return files


def read_text(path: Path) -> str | None:
    """A file's text (gunzipped for .gz), or None for binary and non-UTF-8 files."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        if b"\0" in data:
            return None
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def jsonl_documents(path: Path, field: str) -> Iterator[Document]:
    for number, record in read_objects(path):
        if field not in record:
            raise LayerSkipError(f"{path}:{number} has no field '{field}'")
        yield record[field]


def dataset_documents(source: DataSource) -> Iterator[Document]:
    import datasets

    try:
        if Path(source.dataset or "").expanduser().is_dir():
            loaded = datasets.load_from_disk(str(Path(source.dataset or "").expanduser()))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[source.split]
        else:
            loaded = datasets.load_dataset(source.dataset, source.name, split=source.split)
    except Exception as error:  # datasets raises many types (connection, missing config/split, missing files)
        raise LayerSkipError(f"cannot load dataset '{source.dataset}': {error}") from None
    if source.field not in loaded.column_names:
        raise LayerSkipError(f"dataset '{source.dataset}' has no column '{source.field}' "
                             f"(columns: {', '.join(loaded.column_names)})")
    yield from loaded[source.field]


@dataclasses.dataclass
class Preparation:
    """What sources that generate their documents need: the model (a `layerskip.load` spec) and a cache folder."""

    model: str | None = None
    cache_dir: Path = Path(".")
    device: str = "auto"


def documents(source: DataSource, preparation: Preparation) -> Iterator[Document]:
    if source.dataset is not None:
        yield from dataset_documents(source)
        return
    if source.self_generated is not None:
        from layerskip.training.self_generated import self_generated_documents

        yield from self_generated_documents(source, preparation.model, preparation.cache_dir,
                                            device=preparation.device)
        return
    for path in source_files(source):
        if path.suffix == ".jsonl":
            yield from jsonl_documents(path, source.field)
        else:
            text = read_text(path)
            if text:
                yield text


class DocumentTokenizer:
    """Token ids for documents: text through the tokenizer with BOS/end tokens around; given ids unchanged."""

    def __init__(self, tokenizer: Any, config: DataConfig, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.prefix: list[int] = []
        self.suffix: list[int] = []
        if tokenizer is not None:
            if config.add_bos and tokenizer.bos_token_id is not None:
                self.prefix = [tokenizer.bos_token_id]
            if config.add_eos:
                named = config.eos_token
                end = tokenizer.eos_token_id if named is None else tokenizer.convert_tokens_to_ids(named)
                if named is None and end is None:
                    raise LayerSkipError("the tokenizer has no EOS token: set data.eos_token, or data.add_eos=false")
                if named is not None and (end is None or tokenizer.convert_ids_to_tokens(end) != named):
                    raise LayerSkipError(f"config key 'data.eos_token': the tokenizer has no token {named!r}")
                self.suffix = [end]

    def __call__(self, batch: list[Document]) -> list[list[int]]:
        texts = [doc for doc in batch if isinstance(doc, str)]
        if texts and self.tokenizer is None:
            raise LayerSkipError("the model ships no tokenizer: give pre-tokenised data "
                                 "(JSONL or dataset records with field: input_ids)")
        encoded = iter(self._encode(texts) if texts else [])
        out = []
        for doc in batch:
            if isinstance(doc, str):
                out.append(self.prefix + next(encoded) + self.suffix)
            elif isinstance(doc, list) and all(isinstance(t, int) and 0 <= t < self.vocab_size for t in doc):
                out.append(doc)
            else:
                raise LayerSkipError(f"a pre-tokenised document is not a list of token ids in [0, {self.vocab_size}): "
                                     f"{str(doc)[:80]}")
        return out

    def _encode(self, texts: list[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: batched, and no warnings about long inputs
            return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_sources(config: DataConfig, tokenizer: Any, vocab_size: int, *, progress: bool = True,
                     preparation: Preparation | None = None) -> np.ndarray:
    """All sources' documents as one stream of token ids (uint32); a source with max_tokens stops at its
    first document that reaches that many tokens (batches are tokenised whole, then cut)."""
    encode = DocumentTokenizer(tokenizer, config, vocab_size)
    pieces: list[np.ndarray] = []
    bar = tqdm(desc="tokenising", unit="doc", disable=not progress, file=sys.stderr)
    for source in config.sources:
        limit = source.max_tokens or float("inf")
        taken = 0
        for batch in _batched(documents(source, preparation or Preparation())):
            for ids in encode(batch):
                if taken >= limit:
                    break
                pieces.append(np.asarray(ids, dtype=np.uint32))
                taken += len(ids)
            bar.update(len(batch))
            if taken >= limit:
                break
    bar.close()
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)


def _batched(docs: Iterator[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == TOKENIZE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def cache_key(config: DataConfig, tokenizer: Any, model: str | None = None) -> str:
    """Changes when the sources, their files (size, mtime), the tokenizer or (for generated data) the model change."""
    paths = [path for source in config.sources
             for path in (source_files(source) if source.path is not None else [])
             + ([Path(source.self_generated).expanduser()] if source.self_generated is not None else [])]
    files = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p.exists()]
    tokenizer_id = None if tokenizer is None else [tokenizer.name_or_path, len(tokenizer),
                                                   tokenizer.bos_token_id, tokenizer.eos_token_id]
    payload = {"sources": [vars(s) for s in config.sources], "files": files, "tokenizer": tokenizer_id,
               "add_bos": config.add_bos, "add_eos": config.add_eos, "eos_token": config.eos_token}
    if any(source.self_generated is not None for source in config.sources):
        payload["model"] = model
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_token_stream(config: DataConfig, tokenizer: Any, vocab_size: int, cache_dir: Path, *,
                      is_main: bool, barrier: Callable[[], None], preparation: Preparation | None = None) -> np.ndarray:
    """The token stream from the cache, tokenising (and generating) on the main rank first when it is missing."""
    preparation = preparation or Preparation(cache_dir=cache_dir)
    path = cache_dir / f"tokens-{cache_key(config, tokenizer, preparation.model)}.npy"
    if is_main and not path.is_file():
        tokens = tokenize_sources(config, tokenizer, vocab_size, preparation=preparation)
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise LayerSkipError(f"the tokenizer produced id {int(tokens.max())}, outside the model's vocabulary "
                                 f"of {vocab_size}: the tokenizer does not belong to the model")
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(staging, tokens)
        os.replace(staging, path)
    barrier()
    return np.load(path, mmap_mode="r")


class PackedSequences:
    """Sequences of seq_len + 1 tokens cut from a token stream, in a seeded order per epoch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.width = seq_len + 1
        self.count = len(tokens) // self.width
        if self.count == 0:
            raise LayerSkipError(f"the training data holds {len(tokens)} tokens, fewer than one sequence of "
                                 f"data.seq_len + 1 = {self.width}: add data or lower data.seq_len")
        self.tokens = tokens
        self.seed = seed
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.count

    def sequence_index(self, position: int) -> int:
        """The sequence read at global sample position `position`."""
        epoch, offset = divmod(position, self.count)
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.count, generator=generator))
        return int(self._order[1][offset])

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels [size, seq_len] (int64) for global sample positions [start, start + size)."""
        rows = [self.sequence_index(position) for position in range(start, start + size)]
        window = np.stack([self.tokens[row * self.width:(row + 1) * self.width] for row in rows]).astype(np.int64)
        sequences = torch.from_numpy(window)
        return sequences[:, :-1], sequences[:, 1:]
