"""A sweep's results: results.csv (one row per run), results.md (mean ± std over seeds per
setting), loss_curves.png and final_metrics.png.

    rows = [run_row(run, steps) for run in runs]
    write_report(out, rows, curves={setting: {seed: run_curves(workdir)}})

Everything is read back from the runs' own files (config.json, metrics.jsonl and the sweep's
done marker), so a report can be rebuilt at any time, e.g. after a SLURM array finished.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Iterable, Sequence

import numpy as np

from jaxlm.sweeps.runner import DONE, read_metrics
from jaxlm.sweeps.spec import Run

SKIP_EVAL = ("eval/unigram_loss",)


def run_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} for the train loss and every eval/* loss. A run resumed
    after an interruption logs some steps twice; the last value of a step wins."""
    curves: dict[str, dict[int, float]] = {}
    for record in read_metrics(workdir):
        step = record.get("step")
        for key, value in record.items():
            if key == "loss" or (key.startswith("eval/") and key not in SKIP_EVAL):
                if isinstance(value, (int, float)) and math.isfinite(value) and step:
                    curves.setdefault(key, {})[int(step)] = float(value)
    return {k: sorted(v.items()) for k, v in curves.items()}


def run_tokens(workdir: str) -> dict[int, float]:
    """{step: tokens trained on after it}: the loop's `tokens_seen` where logged (a batch-size
    ramp), else step × batch_size × seq_len; eval-only steps are interpolated from these."""
    seen = {int(r["step"]): float(r["tokens_seen"]) for r in read_metrics(workdir)
            if "tokens_seen" in r}
    data = _config(workdir).get("data", {})
    per_step = float(data.get("batch_size", 0)) * float(data.get("seq_len", 0))
    if not seen:
        return {s: s * per_step for c in run_curves(workdir).values() for s, _ in c}
    steps = np.array(sorted(seen))
    wanted = sorted({s for c in run_curves(workdir).values() for s, _ in c} | set(seen))
    return {s: float(np.interp(s, steps, [seen[k] for k in steps])) for s in wanted}


def _config(workdir: str) -> dict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_row(run: Run, steps: int) -> dict:
    """One results.csv row: setting, seed, status, steps reached, tokens, final losses."""
    curves = run_curves(run.workdir)
    cfg = _config(run.workdir)
    reached = max((s for c in curves.values() for s, _ in c), default=0)
    row = {"setting": run.setting, "seed": run.seed}
    row.update({key: value for key, value in run.setting_overrides})
    row["status"] = ("finished" if reached >= steps and "eval/loss" in curves
                     and curves["eval/loss"][-1][0] >= steps else
                     "missing" if not curves else "partial")
    row["steps"] = reached
    data = cfg.get("data", {})
    tokens_seen = [r["tokens_seen"] for r in read_metrics(run.workdir) if "tokens_seen" in r]
    row["tokens"] = (int(tokens_seen[-1]) if tokens_seen else
                     reached * int(data.get("batch_size", 0)) * int(data.get("seq_len", 0)))
    row["train_loss"] = curves["loss"][-1][1] if "loss" in curves else None
    for key in sorted(k for k in curves if k.startswith("eval/")):
        row[key.replace("/", "_")] = curves[key][-1][1]
    row["wall_time_s"] = None
    marker = os.path.join(run.workdir, DONE)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            row["wall_time_s"] = round(float(json.load(f).get("wall_time_s", float("nan"))), 1)
    row["workdir"] = run.workdir
    return row


def metric_columns(rows: Sequence[dict]) -> list[str]:
    names = ["train_loss"] + sorted({k for r in rows for k in r if k.startswith("eval_")})
    return [n for n in names if any(r.get(n) is not None for r in rows)]


def write_csv(path: str, rows: Sequence[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def _mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    xs = np.array([v for v in values if v is not None], dtype=np.float64)
    if xs.size == 0:
        return math.nan, math.nan, 0
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else 0.0, int(xs.size)


def settings_in_order(rows: Sequence[dict]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row["setting"] not in seen:
            seen.append(row["setting"])
    return seen


def summary(rows: Sequence[dict]) -> list[dict]:
    """Per setting: seeds, mean and sample std of each final metric, mean steps/tokens/time."""
    out = []
    for setting in settings_in_order(rows):
        group = [r for r in rows if r["setting"] == setting]
        entry = {"setting": setting, "seeds": len(group),
                 "finished": sum(r["status"] == "finished" for r in group)}
        for name in metric_columns(rows):
            entry[name] = _mean_std(r.get(name) for r in group)
        entry["steps"] = max(r["steps"] for r in group)
        entry["tokens"] = max(r["tokens"] for r in group)
        entry["wall_time_s"] = _mean_std(r.get("wall_time_s") for r in group)[0]
        out.append(entry)
    return out


def markdown(rows: Sequence[dict], title: str = "", note: str = "") -> str:
    table = summary(rows)
    metrics = metric_columns(rows)
    lines = [f"# {title}" if title else "# Sweep results", ""]
    if note:
        lines += [note, ""]
    lines += ["Final losses (nats/token), mean ± sample std over seeds.", ""]
    header = ["setting", "seeds"] + metrics + ["steps", "tokens", "wall time (s)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        cells = [f"`{entry['setting']}`",
                 f"{entry['finished']}/{entry['seeds']}"]
        for name in metrics:
            mean, std, n = entry[name]
            cells.append("–" if n == 0 else f"{mean:.4f} ± {std:.4f}")
        wall = entry["wall_time_s"]
        cells += [str(entry["steps"]), f"{entry['tokens']:,}",
                  "–" if math.isnan(wall) else f"{wall:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_curve(curves: Sequence[list[tuple[int, float]]]):
    """(steps, mean, std) over the steps every curve has."""
    common = set.intersection(*(set(s for s, _ in c) for c in curves)) if curves else set()
    steps = sorted(common)
    values = np.array([[dict(c)[s] for s in steps] for c in curves], dtype=np.float64)
    if not steps:
        return np.array([]), np.array([]), np.array([])
    return np.array(steps), values.mean(0), values.std(0)


def plot_curves(path: str, curves: dict[str, list[dict]], metrics: Sequence[str] = ("loss",
                "eval/loss"), title: str = "", xlabel: str = "step") -> None:
    """One panel per metric; per setting the mean over seeds (band: ± std)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [m for m in metrics if any(m in c for runs in curves.values() for c in runs)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for setting, runs in curves.items():
            series = [c[metric] for c in runs if c.get(metric)]
            if not series:
                continue
            steps, mean, std = mean_curve(series)
            (line,) = ax.plot(steps, mean, label=f"{setting} (n={len(series)})",
                              marker="o" if len(steps) < 12 else None, markersize=3)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=line.get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (nats/token)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_final(path: str, rows: Sequence[dict], title: str = "") -> None:
    """One panel per final metric: a bar per setting (mean over seeds), error bar ± std, the
    seeds as dots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = metric_columns(rows)
    settings = settings_in_order(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.5, 1.1 * len(settings) + 2)
                                                       * len(metrics), 4.2), squeeze=False)
    x = np.arange(len(settings))
    for ax, metric in zip(axes[0], metrics):
        stats = [_mean_std(r.get(metric) for r in rows if r["setting"] == s) for s in settings]
        means = np.array([m for m, _, _ in stats])
        ax.bar(x, means, yerr=[s for _, s, _ in stats], capsize=4, alpha=0.7)
        for i, s in enumerate(settings):
            ys = [r[metric] for r in rows if r["setting"] == s and r.get(metric) is not None]
            ax.plot([i] * len(ys), ys, "k.", markersize=4)
        finite = means[np.isfinite(means)]
        if finite.size:
            spread = max(float(np.nanmax([m + s for m, s, _ in stats]) - finite.min()), 1e-3)
            ax.set_ylim(finite.min() - 1.5 * spread, np.nanmax([m + s for m, s, _ in stats])
                        + 0.5 * spread)
        ax.set_xticks(x)
        ax.set_xticklabels(settings, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"final {metric}")
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: str, runs: Sequence[Run], steps_of, *, title: str = "",
                 note: str = "") -> list[dict]:
    """results.csv, results.md, loss_curves.png, final_metrics.png in `out`; returns rows."""
    rows = [run_row(r, steps_of(r)) for r in runs]
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "results.csv"), rows)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown(rows, title, note))
    curves: dict[str, list[dict]] = {}
    for run in runs:
        curves.setdefault(run.setting, []).append(run_curves(run.workdir))
    if any(c for cs in curves.values() for c in cs):
        plot_curves(os.path.join(out, "loss_curves.png"), curves, title=title)
        if any("tokens_seen" in r for run in runs for r in read_metrics(run.workdir)):
            by_tokens: dict[str, list[dict]] = {}
            for run in runs:  # x = tokens: a batch-size ramp takes more tokens per step
                tokens = run_tokens(run.workdir)
                by_tokens.setdefault(run.setting, []).append(
                    {k: [(int(tokens[s]), v) for s, v in c]
                     for k, c in run_curves(run.workdir).items()})
            plot_curves(os.path.join(out, "loss_vs_tokens.png"), by_tokens, title=title,
                        xlabel="tokens")
        plot_final(os.path.join(out, "final_metrics.png"), rows, title=title)
    return rows
