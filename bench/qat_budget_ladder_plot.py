"""Draw the QAT budget ladder (held-out PPL against training tokens, one line per width) from the ablation JSONs.

    python bench/qat_budget_ladder_plot.py --float-ppl 14.03 --out bench/results/qat_budget_ladder.png \\
        bench/results/qat_recipe_vs_parq_widths.json bench/results/qat_recipe_combos_2bit.json \\
        bench/results/qat_budget_ladder_smollm2.json \\
        bench/results/qat_ladder_10m/ladder_*.json bench/results/qat_ladder_10m/q4_0_final.json

Rows of method "qat" with the default recipe's settings (whatever the recipe was named when run), per-row steps and a
float table (no ``group``/``target``/``emb``) are the ladder, plus the group-wise Q4_0-layout line; seed 0 only, so
each (bits, tokens) point is one run. The goals are the ones the ladder was run against (x float PPL).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qat.recipe import recipe

GOALS = {4.0: 1.05, 3.0: 1.15, 2.0: 2.0, 1.58: 3.0}
DEFAULT = {"alpha_init": "mse", "anneal_frac": 0.4, "alpha_lr_scale": 10.0, "distill_weight": 1.0}


def ladder_points(paths: list[Path]) -> dict[tuple[float, int | None], list[tuple[int, float]]]:
    """{(bits, group size): [(train tokens, held-out PPL), ...]} sorted by tokens."""
    points: dict[tuple[float, int | None], list[tuple[int, float]]] = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            settings = {k: (row.get("recipe") or {}).get(k) for k in DEFAULT}
            if (row.get("method") != "qat" or settings != DEFAULT or row.get("seed", 0)
                    or "target" in row or ("emb" in row and "group" not in row) or row["bits"] not in GOALS
                    or row.get("lr") != recipe("default").lr_for(row["bits"], grouped="group" in row)):
                continue
            key = (row["bits"], row.get("group"))
            points.setdefault(key, []).append((row["train_tokens"], row["heldout_ppl"]))
    return {key: sorted(set(p)) for key, p in sorted(points.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--float-ppl", type=float, required=True)
    ap.add_argument("--out", type=Path, default=Path("bench/results/qat_budget_ladder.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = ladder_points(args.results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (bits, group), pts in points.items():
        name = f"{bits:g}-bit" + (f" per {group} (+ table)" if group else "")
        line, = ax.plot([t / 1e6 for t, _ in pts], [p for _, p in pts], marker="s" if group else "o", label=name)
        if not group:
            ax.axhline(GOALS[bits] * args.float_ppl, color=line.get_color(), linestyle=":", linewidth=1)
        print(f"{name:>22}: " + "  ".join(f"{t / 1e6:.2f}M -> {p:.2f} ({p / args.float_ppl:.2f}x)" for t, p in pts))
    ax.axhline(args.float_ppl, color="black", linestyle="--", label=f"float {args.float_ppl:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("Default QAT recipe, SmolLM2-135M: budget ladder (dotted: each width's goal)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    (args.out.with_suffix(".json")).write_text(json.dumps(
        {"float_ppl": args.float_ppl,
         "points": {f"{b:g}" + (f"/g{g}" if g else ""): p for (b, g), p in points.items()}}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
