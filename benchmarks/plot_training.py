"""Training curves from `layerskip train` runs: each early exit's agreement with the original final layer, its
cross-entropy, and the final layer's KL to the original, against training tokens, one line per run and exit.

    python benchmarks/plot_training.py runs/smollm2-135m-layerskip-v1 runs/smollm2-135m-layerskip \\
        --labels "first run" "second run" --output docs/images/training_smollm2_layerskip.png
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

PANELS = (("agree_e", "agreement with the original final layer", True),
          ("ce_e", "cross-entropy (nats)", False))


def read_run(folder: Path) -> tuple[list[dict[str, float]], int]:
    """metrics.csv rows as floats, and the tokens per sample (seq_len, from the run's resolved recipe)."""
    metrics, recipe = folder / "metrics.csv", folder / "recipe.yaml"
    if not metrics.is_file() or not recipe.is_file():
        raise SystemExit(f"error: {folder} is not a training run (no metrics.csv and recipe.yaml)")
    with metrics.open(newline="") as handle:
        rows = [{key: float(value) if value not in ("", None) else math.nan for key, value in row.items()}
                for row in csv.DictReader(handle)]
    return rows, yaml.safe_load(recipe.read_text())["data"]["seq_len"]


def early_exits(rows: list[dict[str, float]], num_layers: int) -> list[int]:
    """The early exits (E < L) that were in the loss at some logged step."""
    return [layer for layer in range(1, num_layers)
            if any(not math.isnan(row.get(f"ce_e{layer}", math.nan)) for row in rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="training output_dir folders")
    parser.add_argument("--labels", nargs="*", default=None, help="one per run (default: the folder names)")
    parser.add_argument("--output", default="training_curves.png")
    args = parser.parse_args()
    labels = args.labels or [Path(run).name for run in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"error: {len(args.runs)} runs but {len(labels)} labels")
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run, label in zip(args.runs, labels):
        rows, seq_len = read_run(Path(run))
        tokens = [row["samples"] * seq_len / 1e3 for row in rows]  # samples: global, over ranks and accumulation
        num_layers = sum(1 for key in rows[0] if key.startswith("ce_e"))
        for layer in early_exits(rows, num_layers):
            for axis, (prefix, _, percent) in zip(axes, PANELS):
                values = [row.get(f"{prefix}{layer}", math.nan) * (100 if percent else 1) for row in rows]
                axis.plot(tokens, values, marker=".", label=f"{label}, E={layer}")
        axes[2].plot(tokens, [row["distill_kl"] for row in rows], marker=".", label=label)
    for axis, (_, title, percent) in zip(axes, PANELS):
        axis.set_title(f"early exit: {title}" + (" (%)" if percent else ""))
    axes[2].set_title("final layer: KL to the original")
    for axis in axes:
        axis.set_xlabel("training tokens (thousands)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
