"""How good is every early exit of a model, and what would self-speculation at that depth accept?

For each exit l = 1..L (the shared head after layers [0, l)), on a text set cut into chunks:
  - agreement: the exit's top-1 token equals the last layer's, teacher-forced on the text;
  - perplexity: exp(mean cross-entropy) of the exit against the text's next token;
  - own-output agreement and simulated greedy self-speculation with E = l: measured on the model's own greedy
    continuation of each chunk, because that is what drafts are verified against.

One teacher-forced pass over [chunk + continuation] runs each layer once and applies the head after every
layer, so it yields all L exits. At a continuation position the greedy draft from exit l is the exit's argmax
given the true prefix, and the verifier's token is the continuation token; their per-position match sequence
is therefore exactly what greedy self-speculative decoding sees, and replaying its rounds over that sequence
gives its acceptance rate and tokens per round without decoding once per (E, k).

With a draft adapter (loaded with the model, or --draft_adapter), the same pass also gives, at its exit, the
rank of the model's own token among the adapter's drafts, as a round's first draft sees it (context: the true
final states); replaying rounds of k = 1 over "rank < m" gives the acceptance of tree drafts with m candidates.

Per-chunk measurements are appended to a JSONL file per model, so rerunning continues where a run stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import itertools
import json
import math
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from layerskip.errors import LayerSkipError
from layerskip.jsonl import read_objects
from layerskip.generation import GenerationConfig, GenerationStats
from layerskip.loading import LoadedModel, load
from layerskip.loading.default_model import default_model_name
from layerskip.model import Transformer
from layerskip.model.draft_adapter import previous_positions

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".jsonl")
HEAD_ROWS = 256  # positions per head call: bounds the [rows, vocab] float32 logits (50 MB for a 49k vocabulary)
RANK_CAP = 16  # draft ranks are recorded up to this ("not among the first 16")
ADAPTER_CANDIDATES = (1, 2, 3, 4)  # the tree widths reported for a draft adapter
VERIFY_COST = 1.0  # c_v, see draft_costs

Document = str | list[int]  # a text, or token ids for models that ship no tokenizer


# ---- text sets -------------------------------------------------------------------------------------------

def read_documents(data_paths: Sequence[str], text_field: str = "text") -> list[Document]:
    """Documents from files, folders (their text and code files, recursively), glob patterns and JSONL files.

    `data_paths` entries may be comma-separated lists. A JSONL record's `text_field` holds a text, or a list of
    token ids. Files are read in sorted order, so the same paths give the same documents.
    """
    paths = [part for entry in data_paths for part in entry.split(",") if part]
    if not paths:
        raise LayerSkipError("no --data_path given")
    documents: list[Document] = []
    for path in paths:
        for file in files_under(path):
            documents += read_jsonl(file, text_field) if file.suffix == ".jsonl" else [read_text(file)]
    documents = [doc for doc in documents if (doc.strip() if isinstance(doc, str) else doc)]
    if not documents:
        raise LayerSkipError(f"the text set is empty: no text in {', '.join(paths)}")
    return documents


def files_under(path: str) -> list[Path]:
    """A file as given; a folder's files with a known text suffix; or the files a glob pattern matches."""
    target = Path(path).expanduser()
    if target.is_file():
        return [target]
    if target.is_dir():
        files = sorted(f for f in target.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise LayerSkipError(f"folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return files
    if any(char in path for char in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(target), recursive=True) if Path(f).is_file())
        if files:
            return files
        raise LayerSkipError(f"no files match --data_path {path}")
    raise LayerSkipError(f"--data_path {path}: no such file or folder")


def read_text(file: Path) -> str:
    return file.read_text(encoding="utf-8", errors="replace")


def read_jsonl(file: Path, text_field: str) -> list[Document]:
    documents: list[Document] = []
    for number, record in read_objects(file):
        if text_field not in record:
            raise LayerSkipError(f"{file} line {number} has no field '{text_field}' (fields: {', '.join(record)}): "
                                 f"set --text_field")
        value = record[text_field]
        if isinstance(value, list) and all(isinstance(token, int) for token in value):
            documents.append(value)
        elif isinstance(value, str):
            documents.append(value)
        else:
            raise LayerSkipError(f"{file} line {number}: field '{text_field}' is neither a text nor token ids")
    return documents


def make_chunks(loaded: LoadedModel, documents: Sequence[Document], *, seq_len: int = 256,
                num_samples: int | None = None, seed: int = 42) -> list[list[int]]:
    """Token chunks of `seq_len`: the documents are tokenised, concatenated and cut (a short tail is dropped);
    `num_samples` keeps a deterministic subset (same `seed`, same chunks)."""
    stream: list[int] = []
    for document in documents:
        if isinstance(document, str):
            if loaded.tokenizer is None:
                raise LayerSkipError(f"model '{loaded.name}' ships no tokenizer: give token ids "
                                     f"(a JSONL field holding a list of ids)")
            stream += loaded.tokenizer.encode(document)
        else:
            stream += document
    vocab = loaded.config.vocab_size
    bad = next((token for token in stream if not 0 <= token < vocab), None)
    if bad is not None:
        raise LayerSkipError(f"token id {bad} is outside the vocabulary [0, {vocab}) of model '{loaded.name}'")
    count = len(stream) // seq_len
    if count == 0:
        raise LayerSkipError(f"the text set has {len(stream)} tokens, fewer than --seq_len {seq_len}: "
                             f"add text or lower --seq_len")
    chosen = sorted(random.Random(seed).sample(range(count), num_samples)) \
        if num_samples is not None and num_samples < count else range(count)
    return [stream[i * seq_len:(i + 1) * seq_len] for i in chosen]


# ---- measurement -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class ChunkMeasurement:
    """One chunk's sums, per exit l = 1..L (index l - 1)."""

    digest: str                  # identifies the chunk's tokens, for resuming
    text_positions: int          # positions with a next text token: len(chunk) - 1
    agreements: list[int]        # text positions where exit l's top-1 equals the last layer's
    nll: list[float]             # summed cross-entropy of exit l against the next text token
    own_matches: list[str]       # per continuation token, '1' where exit l's greedy token is the model's own
    adapter_ranks: list[int] | None = None  # per continuation token, its rank among the draft adapter's logits


def chunk_digest(chunk: Sequence[int]) -> str:
    return hashlib.sha1(",".join(map(str, chunk)).encode()).hexdigest()[:16]


def exit_predictions(model: Transformer, ids: torch.Tensor, targets: torch.Tensor,
                     keep: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Top-1 token and cross-entropy against `targets`, [L, T] each, for every exit of one sequence [1, T], and
    the hidden states after each number of layers in `keep`.

    Each layer runs once; the shared head is applied after every layer, HEAD_ROWS positions at a time.
    """
    length = ids.shape[1]
    predicted = torch.empty(model.num_layers, length, dtype=torch.long, device=ids.device)
    nll = torch.empty(model.num_layers, length, dtype=torch.float32, device=ids.device)
    kept = {}
    hidden = model.embed(ids)
    for layer in range(model.num_layers):
        hidden = model.forward_layers(hidden, layer, layer + 1)
        if layer + 1 in keep:
            kept[layer + 1] = hidden
        for start in range(0, length, HEAD_ROWS):
            rows = slice(start, start + HEAD_ROWS)
            logits = model.head(hidden[0, rows])
            predicted[layer, rows] = logits.argmax(-1)
            nll[layer, rows] = F.cross_entropy(logits, targets[rows], reduction="none")
    return predicted, nll, kept


def draft_ranks(loaded: LoadedModel, exit_states: torch.Tensor, final_states: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    """Each position's rank of `targets` among the draft adapter's logits (0: its top draft; capped at RANK_CAP),
    from the exit states and the final states of every position before (a round's first draft's context), through
    the draft slice that decoding uses."""
    model, adapter = loaded.model, loaded.draft_adapter
    context = previous_positions(final_states) if adapter.config.context else None
    cos, sin = model.rope(0, exit_states.shape[1], exit_states.dtype)
    drafted = adapter(exit_states, context, cos, sin)[0]
    vocab_size = int(loaded.defaults.get("draft_vocab_size", 0)) if model.draft_vocab is not None else 0
    ranks = torch.empty(len(targets), dtype=torch.long, device=targets.device)
    for start in range(0, len(targets), HEAD_ROWS):
        rows = slice(start, start + HEAD_ROWS)
        logits = model.draft_head(drafted[rows], vocab_size) if vocab_size else model.head(drafted[rows])
        ranks[rows] = (logits > logits.gather(-1, targets[rows, None])).sum(-1)
    return ranks.clamp_max(RANK_CAP)


def greedy_continuation(loaded: LoadedModel, prompt: list[int], tokens: int) -> list[int]:
    """The full model's greedy continuation, `tokens` long (EOS ignored): what self-speculation must reproduce."""
    if tokens == 0:
        return []
    from layerskip.api import generate_with_config

    config = GenerationConfig(sample=False, ignore_eos=True, max_steps=tokens).resolved(loaded.config.num_hidden_layers,
                                                                                       loaded.defaults)
    return generate_with_config(loaded, prompt, config).token_ids


@torch.inference_mode()
def measure_chunk(loaded: LoadedModel, chunk: list[int], gen_tokens: int) -> ChunkMeasurement:
    """Every exit on the chunk (teacher-forced) and on the model's greedy continuation of it, from one pass."""
    continuation = greedy_continuation(loaded, chunk, gen_tokens)
    sequence = chunk + continuation
    ids = torch.tensor([sequence[:-1]], dtype=torch.long, device=loaded.device)
    targets = torch.tensor(sequence[1:], dtype=torch.long, device=loaded.device)
    adapter, layers = loaded.draft_adapter, loaded.model.num_layers
    keep = (adapter.config.exit_layer, layers) if adapter is not None else ()
    predicted, nll, states = exit_predictions(loaded.model, ids, targets, keep)
    text = len(chunk) - 1  # positions [0, text) predict text; [text, ...) predict the continuation
    own = (predicted[:, text:] == targets[text:]).tolist()
    ranks = None
    if adapter is not None:
        ranks = draft_ranks(loaded, states[adapter.config.exit_layer], states[layers], targets)[text:].tolist()
    return ChunkMeasurement(digest=chunk_digest(chunk), text_positions=text,
                            agreements=(predicted[:, :text] == predicted[-1, :text]).sum(1).tolist(),
                            nll=nll[:, :text].double().sum(1).tolist(),
                            own_matches=["".join("1" if match else "0" for match in row) for row in own],
                            adapter_ranks=ranks)


def measurement_settings(loaded: LoadedModel, gen_tokens: int) -> dict[str, Any]:
    """What a chunk's measurement depends on besides its tokens; the weights by file size and time, so a
    checkpoint retrained into the same folder is measured again."""
    folders = [loaded.folder] + [folder for folder in (loaded.adapter, loaded.draft_adapter_path) if folder is not None]
    weights = sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for folder in folders
                     for f in folder.resolve().glob("*.safetensors"))
    settings = {"folder": str(loaded.folder.resolve()), "weights": hashlib.sha1(json.dumps(weights).encode()).hexdigest(),
                "dtype": str(loaded.dtype).removeprefix("torch."), "device": loaded.device.type, "gen_tokens": gen_tokens}
    if loaded.draft_adapter is not None:  # its ranks are over the draft slice that decoding uses
        settings.update(draft_adapter=str(loaded.draft_adapter_path),
                        draft_vocab_size=int(loaded.defaults.get("draft_vocab_size", 0)))
    return settings


def record_file(loaded: LoadedModel, record_dir: Path, settings: dict[str, Any]) -> Path:
    """One file per model and settings: the model's name for people, a hash of the settings for uniqueness."""
    stem = re.sub(r"[^\w.-]+", "_", Path(loaded.name.rstrip("/")).name) or "model"
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return record_dir / f"{stem}-{tag}.jsonl"


def measure(loaded: LoadedModel, chunks: Sequence[list[int]], *, gen_tokens: int, record_dir: Path | None = None,
            progress: bool = True) -> list[ChunkMeasurement]:
    """Measurements of `chunks`, in order. With `record_dir`, chunks measured there before under the same settings
    are reused, and new ones are appended as they finish."""
    from tqdm import tqdm

    known: dict[str, ChunkMeasurement] = {}
    sink = None
    if record_dir is not None:
        settings = measurement_settings(loaded, gen_tokens)
        path = record_file(loaded, record_dir, settings)
        record_dir.mkdir(parents=True, exist_ok=True)
        known = read_measurements(path)
        sink = path.open("a")
        if not known:
            sink.write(json.dumps({"settings": settings}) + "\n")
    try:
        for chunk in tqdm([c for c in chunks if chunk_digest(c) not in known], desc=f"exits: {loaded.name}",
                          unit="chunk", disable=not progress):
            measurement = measure_chunk(loaded, chunk, gen_tokens)
            known[measurement.digest] = measurement
            if sink is not None:
                sink.write(json.dumps(dataclasses.asdict(measurement)) + "\n")
                sink.flush()
    finally:
        if sink is not None:
            sink.close()
    return [known[chunk_digest(chunk)] for chunk in chunks]


def read_measurements(path: Path) -> dict[str, ChunkMeasurement]:
    """The chunks a previous run recorded after its settings line. A line cut by an interruption ends the
    records; it is removed (that chunk is measured again) so that appended records start on a line of their own."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    known = {}
    for line in lines[1:]:
        try:
            measurement = ChunkMeasurement(**json.loads(line))
        except (ValueError, TypeError):
            break
        known[measurement.digest] = measurement
    if not known or len(lines) > len(known) + 1:
        path.write_text("".join(line + "\n" for line in lines[:len(known) + 1]) if known else "")
    return known


# ---- self-speculation from match sequences -----------------------------------------------------------------

def simulate_greedy_speculation(continuations: Iterable[Sequence[bool]], num_speculations: int) -> GenerationStats:
    """Replay greedy self-speculative decoding over continuations whose token i the draft gets right iff match[i].

    As SelfSpeculative and the driver do: a round drafts min(k, remaining - 1) tokens (the budget leaves room
    for the verifier's token), accepts drafts up to the first mismatch, and commits them plus the verifier's
    token; a round that drafts nothing is not counted in the draft statistics. Every counter of the returned
    statistics equals real decoding's; `seconds` and `prompt_tokens` stay 0.
    """
    stats = GenerationStats()
    for matches in continuations:
        produced = 0
        while produced < len(matches):
            drafted = min(num_speculations, len(matches) - produced - 1)
            accepted = 0
            while accepted < drafted and matches[produced + accepted]:
                accepted += 1
            produced += accepted + 1
            stats.rounds += 1
            stats.new_tokens += accepted + 1
            stats.verify_forwards += 1
            stats.draft_forwards += drafted
            if drafted:
                stats.drafted_tokens += drafted
                stats.accepted_drafts += accepted
                counts = stats.accepted_length_counts
                counts.extend([0] * (accepted + 1 - len(counts)))
                counts[accepted] += 1
    return stats


def draft_costs(model: Transformer) -> list[float]:
    """c_d for every exit l = 1..L: the weights one draft step reads (layers [0, l) and the head) over a full step's.

    Memory-bound decoding costs the bytes of weights read (LAYERSKIP_NOTES.md section 5). With that measure a
    round's verification, layers [l, L) and the head plus the last draft's pass through [0, l), reads one full
    model: c_v = VERIFY_COST = 1. Attention over the KV cache and the k + 1 rows put the real c_v a little
    above 1, so speedups from these costs are estimates, optimistic for small models.
    """
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    head = model.lm_head.weight.numel() + model.norm.weight.numel()
    total = sum(layers) + head
    return [(upto + head) / total for upto in itertools.accumulate(layers)]


def adapter_draft_cost(loaded: LoadedModel) -> float:
    """c_d of a draft through the adapter, by weight bytes as draft_costs: layers [0, E), the adapter, and the head
    or the draft slice decoding uses."""
    model, adapter = loaded.model, loaded.draft_adapter
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    head = model.lm_head.weight.numel()
    vocab_size = int(loaded.defaults.get("draft_vocab_size", 0)) if model.draft_vocab is not None else 0
    drafted = sum(layers[:adapter.config.exit_layer]) + sum(p.numel() for p in adapter.parameters()) + \
        (head * vocab_size // model.config.vocab_size if vocab_size else head)
    return drafted / (sum(layers) + head)


def estimated_speedup(stats: GenerationStats, draft_cost: float) -> float:
    """Tokens per unit of work, against autoregressive decoding's one token per full step."""
    return stats.new_tokens / (stats.drafted_tokens * draft_cost + stats.rounds * VERIFY_COST)


# ---- reports ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ExitRow:
    layer: int
    agreement: float
    perplexity: float
    own_agreement: float | None        # None without continuations (gen_tokens 0)
    acceptance_rate: float | None      # None at the last layer (self-speculation needs E < L) or without drafts
    tokens_per_round: float | None
    draft_cost: float
    est_speedup: float | None


@dataclasses.dataclass
class AdapterRow:
    """Tree drafts of width `candidates` through the draft adapter at its exit, one draft a round (k = 1)."""

    candidates: int
    own_agreement: float               # continuation tokens among the adapter's top `candidates`
    acceptance_rate: float
    tokens_per_round: float
    draft_cost: float
    est_speedup: float


@dataclasses.dataclass
class ExitReport:
    model: str
    num_speculations: int
    chunks: int
    text_positions: int
    own_positions: int
    rows: list[ExitRow]
    adapter_exit: int | None = None    # the draft adapter's exit layer, when the model has one
    adapter_rows: list[AdapterRow] = dataclasses.field(default_factory=list)


def summarize_exits(model: str, measurements: Sequence[ChunkMeasurement], costs: Sequence[float],
                    num_speculations: int) -> ExitReport:
    """Pool the chunks' sums into per-exit rates (ratios of totals, so every position weighs the same)."""
    positions = sum(m.text_positions for m in measurements)
    own_positions = sum(len(m.own_matches[0]) for m in measurements)
    layers = len(costs)
    rows = []
    for index in range(layers):
        matches = [[bit == "1" for bit in m.own_matches[index]] for m in measurements]
        stats = simulate_greedy_speculation(matches, num_speculations)
        speculative = index < layers - 1 and stats.drafted_tokens > 0
        rows.append(ExitRow(
            layer=index + 1,
            agreement=sum(m.agreements[index] for m in measurements) / positions,
            perplexity=math.exp(sum(m.nll[index] for m in measurements) / positions),
            own_agreement=sum(map(sum, matches)) / own_positions if own_positions else None,
            acceptance_rate=stats.acceptance_rate if speculative else None,
            tokens_per_round=stats.mean_tokens_per_round if speculative else None,
            draft_cost=costs[index],
            est_speedup=estimated_speedup(stats, costs[index]) if speculative else None))
    return ExitReport(model=model, num_speculations=num_speculations, chunks=len(measurements),
                      text_positions=positions, own_positions=own_positions, rows=rows)


def summarize_adapter(measurements: Sequence[ChunkMeasurement], draft_cost: float) -> list[AdapterRow]:
    """Replay greedy decoding with the adapter at k = 1 and m candidates over the recorded ranks. As decoding with an
    adapter runs it, each prompt's round drafts nothing (one token), then rounds replay over the remaining tokens."""
    ranks = [m.adapter_ranks for m in measurements if m.adapter_ranks]
    positions = sum(len(r) - 1 for r in ranks)
    if not positions:
        return []
    rows = []
    for candidates in ADAPTER_CANDIDATES:
        matches = [[rank < candidates for rank in chunk[1:]] for chunk in ranks]
        stats = simulate_greedy_speculation(matches, 1)
        stats.rounds += len(ranks)
        stats.new_tokens += len(ranks)
        stats.verify_forwards += len(ranks)
        rows.append(AdapterRow(candidates=candidates, own_agreement=sum(map(sum, matches)) / positions,
                               acceptance_rate=stats.acceptance_rate, tokens_per_round=stats.mean_tokens_per_round,
                               draft_cost=draft_cost, est_speedup=estimated_speedup(stats, draft_cost)))
    return rows


def analyze_exits(loaded: LoadedModel, chunks: Sequence[list[int]], *, gen_tokens: int = 64, num_speculations: int = 4,
                  record_dir: Path | None = None, label: str | None = None, progress: bool = True) -> ExitReport:
    """Measure every exit of `loaded` on token `chunks` (see make_chunks) and pool the results."""
    if not chunks or min(map(len, chunks)) < 2:
        raise LayerSkipError("the text set is empty, or has a chunk shorter than 2 tokens")
    context = loaded.config.max_position_embeddings
    if max(map(len, chunks)) + gen_tokens > context:
        raise LayerSkipError(f"--seq_len + --gen_tokens exceeds the model's context of {context} tokens")
    measurements = measure(loaded, chunks, gen_tokens=gen_tokens, record_dir=record_dir, progress=progress)
    report = summarize_exits(label or loaded.name, measurements, draft_costs(loaded.model), num_speculations)
    if loaded.draft_adapter is not None:
        report.adapter_exit = loaded.draft_adapter.config.exit_layer
        report.adapter_rows = summarize_adapter(measurements, adapter_draft_cost(loaded))
    return report


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def number(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def format_report(report: ExitReport) -> str:
    """A markdown table, then the layer with the best estimated speedup."""
    k = report.num_speculations
    lines = [f"{report.model}: {report.chunks} chunks, {report.text_positions} text positions, "
             f"{report.own_positions} own-output positions",
             f"| layer | agreement | perplexity | own-output agreement | acceptance@{k} | tokens/round@{k} "
             "| est. speedup |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report.rows:
        lines.append(f"| {row.layer} | {percent(row.agreement)} | {row.perplexity:.4g} | "
                     f"{percent(row.own_agreement)} | {percent(row.acceptance_rate)} | "
                     f"{number(row.tokens_per_round, '.2f')} | "
                     f"{number(row.est_speedup, '.2f', 'x')} |")
    best = max((row for row in report.rows if row.est_speedup is not None), key=lambda row: row.est_speedup,
               default=None)
    if best is not None:
        lines.append(f"best estimated: exit layer {best.layer}, {best.est_speedup:.2f}x (weight-bytes cost model, "
                     f"c_d = {best.draft_cost:.2f}, c_v = {VERIFY_COST:g}: an estimate, not a measurement)")
    if report.adapter_rows:
        lines += [f"draft adapter at exit layer {report.adapter_exit}, one draft a round with m candidates "
                  f"(c_d = {report.adapter_rows[0].draft_cost:.2f} by weight bytes):",
                  "| candidates m | own-output agreement (top m) | acceptance@1 | tokens/round@1 | est. speedup |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {row.candidates} | {percent(row.own_agreement)} | {percent(row.acceptance_rate)} | "
                  f"{row.tokens_per_round:.2f} | {row.est_speedup:.2f}x |" for row in report.adapter_rows]
    return "\n".join(lines)


CSV_COLUMNS = ("model", "layer", "agreement", "perplexity", "own_agreement", "acceptance_rate", "tokens_per_round",
               "draft_cost", "est_speedup", "num_speculations", "chunks", "text_positions", "own_positions")


def write_exit_csv(reports: Sequence[ExitReport], path: Path) -> None:
    with path.open("w", newline="") as sink:
        writer = csv.DictWriter(sink, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for report in reports:
            totals = {name: getattr(report, name) for name in ("model", "num_speculations", "chunks", "text_positions",
                                                                 "own_positions")}
            for row in report.rows:
                writer.writerow({**totals, **{key: "" if value is None else value
                                              for key, value in dataclasses.asdict(row).items()}})


LINE_STYLES = ("-", "--", ":", "-.")


def exit_figure(reports: Sequence[ExitReport]) -> Any:
    """Three panels against the exit layer: top-1 rates, perplexity (log scale), estimated speedup.
    Colour tells the metric, line style the model (solid: the first, dashed: the second...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (rates, perplexity, speedup) = plt.subplots(1, 3, figsize=(17, 4.8))
    for report, style in zip(reports, itertools.cycle(LINE_STYLES)):
        layers = [row.layer for row in report.rows]
        drafts = [row for row in report.rows if row.est_speedup is not None]
        rates.plot(layers, [row.agreement for row in report.rows], style, color="C0", marker=".",
                   label=f"agreement with last layer: {report.model}")
        perplexity.plot(layers, [row.perplexity for row in report.rows], style, color="C2", marker=".",
                        label=report.model)
        if drafts:
            rates.plot([row.layer for row in drafts], [row.acceptance_rate for row in drafts], style, color="C1",
                       marker=".", label=f"acceptance (k={report.num_speculations}): {report.model}")
            speedup.plot([row.layer for row in drafts], [row.est_speedup for row in drafts], style, color="C3",
                         marker=".", label=report.model)
    speedup.axhline(1.0, color="grey", linewidth=0.8)
    rates.set(title="top-1 agreement and self-speculative acceptance", xlabel="exit layer", ylim=(0, 1.02))
    perplexity.set(title="early-exit perplexity", xlabel="exit layer", yscale="log")
    speedup.set(title=f"estimated speedup (k={reports[0].num_speculations}, weight-bytes cost model)",
                xlabel="exit layer E")
    for axes in (rates, perplexity, speedup):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def draw_exit_plot(reports: Sequence[ExitReport], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure = exit_figure(reports)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_exit_report(reports: Sequence[ExitReport], output_dir: Path) -> tuple[Path, Path]:
    """exits.csv and exits.png under `output_dir`; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = output_dir / "exits.csv", output_dir / "exits.png"
    write_exit_csv(reports, csv_path)
    draw_exit_plot(reports, png_path)
    return csv_path, png_path


def model_labels(names: Sequence[str]) -> list[str]:
    """Short names for legends (a path's last part), or the full names when the short ones collide."""
    short = [Path(name.rstrip("/")).name or name for name in names]
    return short if len(set(short)) == len(short) else list(names)


def run_exit_analysis(models: Sequence[str | None], data_paths: Sequence[str], output_dir: Path, *,
                      text_field: str = "text", seq_len: int = 256, num_samples: int | None = None,
                      gen_tokens: int = 64, num_speculations: int = 4, seed: int = 42, dtype: str | None = None,
                      device: str = "auto", quantize: str = "none", draft_adapter: str | None = None,
                      compile: bool = False, progress: bool = True) -> list[ExitReport]:
    """The `layerskip exits` command: analyse each model (None: the embedded default) on the same text set,
    then write exits.csv, exits.png and the per-model measurements under `output_dir`."""
    for flag, value, least in (("--seq_len", seq_len, 2), ("--gen_tokens", gen_tokens, 0),
                               ("--num_speculations", num_speculations, 1), ("--num_samples", num_samples, 1)):
        if value is not None and value < least:
            raise LayerSkipError(f"{flag} must be at least {least}, got {value}")
    documents = read_documents(data_paths, text_field)
    reports = []
    for spec, label in zip(models, model_labels([spec or default_model_name() for spec in models])):
        loaded = load(spec, dtype=dtype, device=device, quantize=quantize, draft_adapter=draft_adapter,
                      compile=compile)
        chunks = make_chunks(loaded, documents, seq_len=seq_len, num_samples=num_samples, seed=seed)
        reports.append(analyze_exits(loaded, chunks, gen_tokens=gen_tokens, num_speculations=num_speculations,
                                     record_dir=output_dir / "measurements", label=label, progress=progress))
        del loaded  # one model in memory at a time
    write_exit_report(reports, output_dir)
    return reports


__all__ = ["AdapterRow", "ChunkMeasurement", "ExitReport", "ExitRow", "analyze_exits", "draft_costs",
           "draw_exit_plot", "exit_figure", "format_report", "make_chunks", "measure", "read_documents",
           "run_exit_analysis", "simulate_greedy_speculation", "summarize_exits", "write_exit_report"]
