"""The answer: every variant's mAP on the real validation set, against the real-only variant.

`build_report` turns the runs (one per variant and seed) into report.json's content: per variant
the mean over seeds of mAP50 and mAP50-95, overall and per class, and the difference from the
real-only variant; `table` is what the stage prints; `chart` is the picture logged to MLflow.
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path

from diffplat.config import REAL_VARIANT

METRICS = ("map50", "map50_95")
LABELS = {"map50": "mAP50", "map50_95": "mAP50-95"}


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _summary(runs: list[dict]) -> dict:
    """Means over a variant's seeds (and the spread, with more than one)."""
    out = {m: _mean([r[m] for r in runs]) for m in (*METRICS, "precision", "recall")}
    if len(runs) > 1:
        out.update({f"{m}_std": statistics.stdev([r[m] for r in runs]) for m in METRICS})
    classes = sorted({c for r in runs for c in r["per_class"]})
    out["per_class"] = {c: {m: _mean([r["per_class"][c][m] for r in runs if c in r["per_class"]]) for m in METRICS}
                        for c in classes}  # fmt: skip
    return out


def _delta(runs: list[dict], real_runs: list[dict]) -> dict:
    """The mean over seeds of (variant - real-only), each seed against the same seed: a seed that
    failed on one side is left out of both."""
    real = {r["seed"]: r for r in real_runs}
    pairs = [(r, real[r["seed"]]) for r in runs if r["seed"] in real]
    if not pairs:
        return {}
    delta = {m: _mean([r[m] - q[m] for r, q in pairs]) for m in METRICS}
    classes = sorted({c for r, q in pairs for c in r["per_class"] if c in q["per_class"]})
    delta["per_class"] = {c: {m: _mean([r["per_class"][c][m] - q["per_class"][c][m] for r, q in pairs
                                        if c in r["per_class"] and c in q["per_class"]]) for m in METRICS}
                          for c in classes}  # fmt: skip
    return delta


def build_report(variants: list[dict], val: dict, detector: dict) -> dict:
    """`variants`: name, train_images (set -> images), runs (validation metrics per seed), in
    order, the real-only one first."""
    real = None
    rows = []
    for v in variants:
        row = {"name": v["name"], "train_images": v["train_images"], "seeds": [r["seed"] for r in v["runs"]],
               **_summary(v["runs"]), "runs": v["runs"]}  # fmt: skip
        if v["name"] == REAL_VARIANT:
            real = row
        rows.append(row)
    for row in rows:
        if real is not None and row is not real:
            row["delta"] = _delta(row["runs"], real["runs"])
    instances = {}
    for row in rows:
        for run in row["runs"]:
            for c, v in run["per_class"].items():
                instances[c] = v["instances"]
    return {"val": {**val, "instances_per_class": instances}, "detector": detector, "variants": rows}


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def table(report: dict) -> str:
    """Overall, then per class: each variant's mAP and its difference from real-only."""
    rows = report["variants"]
    width = max(len("variant"), *(len(r["name"]) for r in rows))
    vs = f"vs {REAL_VARIANT}"
    head = f"  {'variant':<{width}}  {'train images':<24} {'mAP50':>6} {vs:>7}  {'mAP50-95':>8} {vs:>7}"
    lines = [head]
    for r in rows:
        images = " + ".join(f"{n} {s}" for s, n in r["train_images"].items())
        d = r.get("delta")
        spread = f"  (std over seeds {r['map50_std']:.3f} / {r['map50_95_std']:.3f})" if "map50_std" in r else ""
        lines.append(f"  {r['name']:<{width}}  {images:<24} {r['map50']:>6.3f} {_signed(d['map50']) if d else '':>7}"
                     f"  {r['map50_95']:>8.3f} {_signed(d['map50_95']) if d else '':>7}{spread}")  # fmt: skip
    classes = list(rows[0]["per_class"]) if rows else []
    if classes:
        cw = max(len("class"), *(len(c) for c in classes))
        lines.append(f"  mAP50 per class (difference from {REAL_VARIANT}):")
        lines.append(f"  {'class':<{cw}} {'objects':>7}  " + "  ".join(f"{r['name']:>{max(len(r['name']), 14)}}" for r in rows))
        for c in classes:
            cells = []
            for r in rows:
                value = r["per_class"].get(c, {}).get("map50", float("nan"))
                d = r.get("delta", {}).get("per_class", {}).get(c)
                cell = f"{value:.3f}" + (f" ({_signed(d['map50'])})" if d else "")
                cells.append(f"{cell:>{max(len(r['name']), 14)}}")
            lines.append(f"  {c:<{cw}} {report['val']['instances_per_class'].get(c, 0):>7}  " + "  ".join(cells))
    return "\n".join(lines)


def chart(report: dict, path: Path) -> Path:
    """Grouped bars: mAP50 and mAP50-95, overall and per class, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffplat.fileio import write_bytes_atomic

    rows = report["variants"]
    groups = ["all", *rows[0]["per_class"]] if rows else ["all"]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(groups) * max(1, len(rows)) / 2 + 2), 6.5), sharex=True)
    width = 0.8 / max(1, len(rows))
    for ax, metric in zip(axes, METRICS):
        for k, r in enumerate(rows):
            values = [r[metric]] + [r["per_class"].get(c, {}).get(metric, 0.0) for c in groups[1:]]
            xs = [g + (k - (len(rows) - 1) / 2) * width for g in range(len(groups))]
            bars = ax.bar(xs, values, width, label=r["name"])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_ylabel(LABELS[metric])
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(f"real validation set: {report['val']['images']} images; mean over seeds {rows[0]['seeds'] if rows else []}")
    axes[0].legend(loc="upper right", fontsize="small")
    axes[1].set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path
