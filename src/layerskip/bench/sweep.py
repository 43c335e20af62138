"""A grid of (exit_layer, num_speculations[, draft_confidence][, draft_candidates]) on one fixed sample set, plus an
autoregressive baseline row.

Each point is a resumable benchmark run under <output_dir>/points/; its CSV row is written as soon as it
is measured, and rerunning the same command skips the points already in the CSV.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

from layerskip.bench.engines import Engine
from layerskip.bench.runner import run_benchmark
from layerskip.errors import LayerSkipError
from layerskip.eval.datasets import Sample
from layerskip.generation import GenerationConfig
from layerskip.loading import LoadedModel
from layerskip.loading.hf_folder import update_generation_defaults

QUALITY = ("rouge1", "rouge2", "rougeL", "bleu", "exact_match")
COLUMNS = ("exit_layer", "num_speculations", "draft_confidence", "draft_candidates", "acceptance_rate", "tokens_per_second",
           "time_per_token", "total_time", "speedup_vs_autoregressive", *QUALITY)


def parse_grid(text: str, flag: str) -> list[int]:
    """'4,8,12' or an inclusive range 'start:stop:step' ('2:8:2' -> 2, 4, 6, 8)."""
    try:
        if ":" in text:
            start, stop, *step = (int(part) for part in text.split(":"))
            return list(range(start, stop + 1, step[0] if step else 1))
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LayerSkipError(f"{flag} takes a list '4,8,12' or a range 'start:stop:step', got '{text}'") from None


def parse_float_list(text: str, flag: str) -> list[float]:
    """'0,0.5,0.8'."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LayerSkipError(f"{flag} takes a list of numbers '0,0.5,0.8', got '{text}'") from None


def run_sweep(loaded: LoadedModel, samples: Sequence[Sample], base: GenerationConfig, exit_layers: list[int],
              speculations: list[int], output_dir: Path, *, make_engine: Callable[[GenerationConfig], Engine],
              arguments: dict[str, Any], chat: bool = False, confidences: Sequence[float] | None = None,
              candidates: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Run every point not yet in <output_dir>/sweep.csv; `confidences` and `candidates` add draft_confidence and
    draft_candidates as further axes (default: the base config's alone)."""
    layers = loaded.config.num_hidden_layers
    points = [dataclasses.replace(base, generation_strategy="autoregressive", exit_layer=-1, num_speculations=-1,
                                  draft_vocab_size=0, draft_confidence=0.0, draft_candidates=1)]
    points += [dataclasses.replace(base, generation_strategy="self_speculative", exit_layer=e, num_speculations=k,
                                   draft_confidence=c, draft_candidates=m).resolved(layers, loaded.defaults)
               for e in exit_layers for k in speculations for c in (confidences or [base.draft_confidence])
               for m in (candidates or [base.draft_candidates])]
    csv_path = output_dir / "sweep.csv"
    rows = list(csv.DictReader(csv_path.open())) if csv_path.is_file() else []
    if rows and list(rows[0]) != list(COLUMNS):  # written before a column was added: the same rows, today's header
        with csv_path.open("w", newline="") as sink:
            writer = csv.DictWriter(sink, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    done = {point_key(row) for row in rows}
    baseline_speed = next((float(row["tokens_per_second"]) for row in rows if int(row["num_speculations"]) == 0), None)
    output_dir.mkdir(parents=True, exist_ok=True)
    with csv_path.open("a", newline="") as sink:
        writer = csv.DictWriter(sink, fieldnames=COLUMNS)
        if not rows:
            writer.writeheader()
        for config in points:
            key = (config.exit_layer, config.num_speculations, config.draft_confidence, config.draft_candidates) \
                if config.generation_strategy == "self_speculative" else (layers, 0, 0.0, 1)
            if key in done:
                continue
            name = point_name(key)
            summary = run_benchmark(loaded, make_engine(config), samples, output_dir / "points" / name,
                                    arguments={**arguments, **dataclasses.asdict(config)}, chat=chat, resume=True,
                                    description=name)["metrics"]
            if baseline_speed is None:
                baseline_speed = summary["tokens_per_second"]
            row = {"exit_layer": key[0], "num_speculations": key[1], "draft_confidence": key[2], "draft_candidates": key[3],
                   "acceptance_rate": summary.get("acceptance_rate", ""),
                   "tokens_per_second": summary["tokens_per_second"], "time_per_token": summary["time_per_token"],
                   "total_time": summary["total_time"],
                   "speedup_vs_autoregressive": summary["tokens_per_second"] / baseline_speed,
                   **{name: summary[name] for name in QUALITY}}
            writer.writerow(row)
            sink.flush()
            rows.append(row)
    draw_heatmap([r for r in rows if int(r["num_speculations"]) > 0], output_dir / "sweep_heatmap.png")
    return rows


def point_key(row: dict[str, Any]) -> tuple[int, int, float, int]:
    """(E, k, draft confidence, draft candidates) of a CSV row; rows written before those columns have 0 (no
    confidence stop) and 1 (a plain chain)."""
    return (int(row["exit_layer"]), int(row["num_speculations"]), float(row.get("draft_confidence") or 0.0),
            int(row.get("draft_candidates") or 1))


def point_name(key: tuple[int, int, float, int]) -> str:
    """The point's folder under points/: E8_k4, E8_k4_c0.8 with a confidence stop, E8_k4_m3 with three candidates
    at the last draft position, or autoregressive (k = 0)."""
    exit_layer, k, confidence, candidates = key
    if k == 0:
        return "autoregressive"
    return f"E{exit_layer}_k{k}" + (f"_c{confidence:g}" if confidence > 0 else "") + \
        (f"_m{candidates}" if candidates > 1 else "")


def best_point(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest self-speculative row of a sweep."""
    return max((row for row in rows if int(row["num_speculations"]) > 0),
               key=lambda row: float(row["speedup_vs_autoregressive"]))


def save_defaults(folder: Path, best: dict[str, Any], base: GenerationConfig, dataset: str,
                  min_speedup: float = 1.05) -> dict[str, Any]:
    """Store the sweep's best point as the model's decoding defaults (layerskip.json, other keys kept).

    The default strategy becomes self-speculative only when that point beat autoregressive decoding by
    `min_speedup`: the best of many noisy timings against one autoregressive timing is biased upwards,
    so a bare win of 1.01x is more likely noise than speed.
    """
    speedup = float(best["speedup_vs_autoregressive"])
    return update_generation_defaults(folder, {
        "generation_strategy": "self_speculative" if speedup >= min_speedup else "autoregressive",
        "exit_layer": int(best["exit_layer"]), "num_speculations": int(best["num_speculations"]),
        "draft_vocab_size": base.draft_vocab_size, "draft_confidence": point_key(best)[2],
        "draft_candidates": point_key(best)[3],
        "sweep": {"dataset": dataset, "speedup_vs_autoregressive": round(speedup, 3),
                  "acceptance_rate": round(float(best["acceptance_rate"]), 4)}})


def draw_heatmap(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Speedup over autoregressive decoding for every (exit_layer, num_speculations), annotated; with several
    draft confidences or candidate counts, each cell shows the best of them and which it was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    if not rows:
        return
    exits = sorted({int(r["exit_layer"]) for r in rows})
    specs = sorted({int(r["num_speculations"]) for r in rows})
    confidences, candidate_counts = ({point_key(row)[axis] for row in rows} for axis in (2, 3))
    grid = [[float("nan")] * len(exits) for _ in specs]
    labels = [[""] * len(exits) for _ in specs]
    for row in rows:
        exit_layer, k, confidence, candidates = point_key(row)
        y, x, speedup = specs.index(k), exits.index(exit_layer), float(row["speedup_vs_autoregressive"])
        if not grid[y][x] >= speedup:  # NaN (empty) or slower
            grid[y][x] = speedup
            labels[y][x] = f"{speedup:.2f}x" + (f"\nc={confidence:g}" if len(confidences) > 1 else "") + \
                (f"\nm={candidates}" if len(candidate_counts) > 1 else "")
    figure, axes = plt.subplots(figsize=(1.2 * len(exits) + 2.5, 0.8 * len(specs) + 2))
    values = [value for line in grid for value in line if value == value]
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(0.5, *values), vmax=max(1.5, *values))  # red: slower, green: faster
    image = axes.imshow(grid, cmap="RdYlGn", norm=norm, origin="lower", aspect="auto")
    for y, line in enumerate(labels):
        for x, label in enumerate(line):
            axes.text(x, y, label, ha="center", va="center", fontsize=9)
    axes.set_xticks(range(len(exits)), exits)
    axes.set_yticks(range(len(specs)), specs)
    axes.set_xlabel("exit layer E")
    axes.set_ylabel("speculations k")
    axes.set_title("self-speculative speedup vs autoregressive")
    figure.colorbar(image, ax=axes, label="speedup")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
