"""Held-out draft agreement against training tokens: draft adapter runs (`layerskip train` with
`draft_adapter.enabled`, their metrics.csv), with the earlier measurements of benchmarks/data/draft_frontier_points.csv
(LayerSkip LoRA runs and MLP probes) on the same axes.

    python benchmarks/plot_draft_frontier.py runs/smollm2-135m-draft --output docs/images/draft_frontier.png
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

POINTS = Path(__file__).parent / "data" / "draft_frontier_points.csv"


def run_curve(folder: Path) -> tuple[str, list[float], list[float]]:
    """(label, tokens, held-out agreement) at each evaluation of a draft adapter run."""
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    settings = recipe["draft_adapter"]
    per_step = recipe["data"]["batch_size"] * recipe["data"]["seq_len"]
    tokens, agreement = [], []
    with (folder / "metrics.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            value = float(row["heldout_agreement"] or "nan")
            if not math.isnan(value):
                tokens.append(int(row["step"]) * per_step)
                agreement.append(value)
    label = (f"draft adapter {folder.name}: {settings['kind']}{' + context' if settings['context'] else ''}, "
             f"E={settings['exit_layer']} (tokens seen; epochs repeat)")
    return label, tokens, agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, default=Path("docs/images/draft_frontier.png"))
    args = parser.parse_args()
    figure, axes = plt.subplots(figsize=(8, 5))
    groups: dict[str, list[tuple[int, float]]] = {}
    with POINTS.open(newline="") as handle:
        for row in csv.DictReader(handle):
            groups.setdefault(f"{row['method']}, E={row['exit_layer']}", []).append(
                (int(row["tokens"]), float(row["heldout_agreement"])))
    for label, points in groups.items():
        points.sort()
        axes.plot(*zip(*points), marker="o", linestyle="--", label=label)
    for folder in args.runs:
        label, tokens, agreement = run_curve(folder)
        axes.plot(tokens, agreement, marker="s", linewidth=2, label=label)
    axes.set_xscale("log")
    axes.set_xlabel("training tokens")
    axes.set_ylabel("held-out top-1 agreement of the first draft")
    axes.yaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:.0%}"))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title("SmolLM2-135M-Instruct: draft agreement against training data")
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=120)
    print(args.output)


if __name__ == "__main__":
    main()
