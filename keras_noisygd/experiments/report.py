"""Tables, CSV/JSON files and PNG plots of a comparison's runs."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

COLUMNS = ("method", "seed", "train_acc", "test_acc", "gap", "train_loss", "test_loss", "steps", "seconds", "compile_seconds")
CURVE_COLUMNS = ("method", "seed", "updates", "train_loss", "train_acc", "test_loss", "test_acc")


# Settings that do not change what a run computes: a resumed comparison may differ in these.
_NOT_COMPARED = ("resume", "seeds", "noise", "out", "config")  # `config` is derived from the flags


class Journal:
    """`runs.jsonl` in the output folder: one line per finished run, so a comparison can be resumed.

    The first line holds the settings; `resume=True` keeps the runs of a journal
    whose settings match (apart from `seeds`, `noise` and `out`, which only
    choose which runs exist) and raises ValueError if they differ. Without
    `resume` an existing journal is replaced.
    """

    def __init__(self, out_dir, settings, resume=False):
        self.path = Path(out_dir) / "runs.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.all_settings = settings
        self.settings = {k: v for k, v in settings.items() if k not in _NOT_COMPARED}
        self.settings = json.loads(json.dumps(self.settings))  # tuples -> lists, as the file holds them
        self.runs = {}
        if resume and self.path.exists():
            lines = _read_lines(self.path)
            if lines and lines[0].get("settings") != self.settings:
                old = lines[0].get("settings", {})
                differ = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
                raise ValueError(
                    f"Argument `--resume` needs the settings of {self.path}; these differ: "
                    + ", ".join(f"{k}={old.get(k)!r} there, {self.settings.get(k)!r} now" for k in differ)
                )
            self.runs = {(r["method"], r["seed"]): r for r in lines[1:]}
        else:
            self.path.write_text(json.dumps({"settings": self.settings}) + "\n")

    def get(self, method, seed):
        return self.runs.get((method, seed))

    def add(self, run):
        self.runs[(run["method"], run["seed"])] = run
        with open(self.path, "a") as f:
            f.write(json.dumps(run) + "\n")
        return run


def _read_lines(path):
    """The journal's records; a last line cut short by a crash during its write is dropped from the file."""
    text = path.read_text()
    lines = text.splitlines()
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError:
        if not text.endswith("\n") and lines:  # only the line being written when the process died
            path.write_text("".join(line + "\n" for line in lines[:-1]))
            return [json.loads(line) for line in lines[:-1] if line.strip()]
        raise


def summarize(runs):
    """Per method, in first-seen order: mean and std over seeds of each numeric column."""
    grouped = defaultdict(list)
    for run in runs:
        grouped[run["method"]].append(run)
    summary = []
    for method, group in grouped.items():
        row = {"method": method, "seeds": len(group)}
        for key in ("test_acc", "train_acc", "gap", "steps", "seconds", "compile_seconds"):
            values = np.array([np.nan if r.get(key) is None else r[key] for r in group], float)  # older journals lack some
            row[key], row[key + "_std"] = float(values.mean()), float(values.std())
        summary.append(row)
    return summary


def table(summary):
    """The summary as a plain-text table."""
    width = max(len("method"), *(len(r["method"]) for r in summary))
    lines = [f"{'method':<{width}}  {'test acc':>17}  {'train acc':>9}  {'gap':>7}  {'steps':>6}  {'train s':>7}  {'compile s':>9}"]
    for r in summary:
        lines.append(
            f"{r['method']:<{width}}  {r['test_acc']:>8.4f} ± {r['test_acc_std']:.4f}  {r['train_acc']:>9.4f}  "
            f"{r['gap']:>7.4f}  {r['steps']:>6.0f}  {r['seconds']:>7.1f}  {_seconds(r['compile_seconds']):>9}"
        )
    return "\n".join(lines)


def markdown(summary, baseline, target):
    """A Markdown table with the share of the `baseline` -> `target` test-accuracy gap each other method closes.

    The share is left out ("no gap") when the gap is not larger than the seed
    standard deviation of either end: a share of a gap within the seed spread
    is a ratio of noise (e.g. -117% and 217% for a gap of 0.1 points).
    """
    rows = {r["method"]: r for r in summary}
    gap = rows[target]["test_acc"] - rows[baseline]["test_acc"]
    no_gap = abs(gap) <= max(rows[baseline]["test_acc_std"], rows[target]["test_acc_std"])
    lines = ["| method | test acc | train acc | gap | train s | compile s | share of the gap closed |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        if r["method"] in (baseline, target):
            share = ""
        elif no_gap:
            share = "no gap"
        else:
            share = f"{100 * (r['test_acc'] - rows[baseline]['test_acc']) / gap:.0f}%"
        lines.append(
            f"| {r['method']} | {r['test_acc']:.4f} ± {r['test_acc_std']:.4f} | {r['train_acc']:.4f} | "
            f"{r['gap']:.4f} | {r['seconds']:.1f} | {_seconds(r.get('compile_seconds'))} | {share} |"
        )
    return "\n".join(lines) + "\n"


def _seconds(value):
    return "-" if value is None or np.isnan(value) else f"{value:.1f}"


def points(run):
    """A run's learning curve as dicts; a journal written before 2026-12-06 holds `(updates, test_acc)` pairs."""
    return [p if isinstance(p, dict) else dict(updates=p[0], test_acc=p[1]) for p in run["curve"]]


def write(out_dir, config, runs, title, baseline, target):
    """Writes runs.csv, curves.csv, results.json, summary.md, test_accuracy.png and train_test.png into `out_dir`.

    Returns their paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(dict(method=run["method"], seed=run["seed"], **p) for run in runs for p in points(run))
    summary = summarize(runs)
    (out / "results.json").write_text(json.dumps({"config": config, "summary": summary, "runs": runs}, indent=2))
    (out / "summary.md").write_text(markdown(summary, baseline, target))
    plot(runs, out / "test_accuracy.png", title, [("test_acc", "test accuracy")])
    plot(runs, out / "train_test.png", title, [("train_acc", "train accuracy"), ("test_acc", "test accuracy"),
                                               ("train_loss", "train loss"), ("test_loss", "test loss")])
    return [out / name for name in ("runs.csv", "curves.csv", "results.json", "summary.md", "test_accuracy.png", "train_test.png")]


def plot(runs, path, title, panels):
    """One panel per `(key, label)` of `panels`: the mean over seeds against the update, per method, with a +-1 std band.

    Four panels are drawn 2 x 2 (train beside test); a key the runs lack (an
    older journal's) leaves its panel empty.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = defaultdict(list)
    for run in runs:
        curves[run["method"]].append(points(run))
    rows, cols = (2, 2) if len(panels) == 4 else (1, len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols if cols < 2 else 11, 4.5 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        for i, (method, group) in enumerate(curves.items()):
            if any(key not in p for curve in group for p in curve):
                continue
            steps = np.array([p["updates"] for p in group[0]])
            values = np.array([[p[key] for p in curve] for curve in group])
            mean, std = values.mean(0), values.std(0)
            (line,) = ax.plot(steps, mean, label=method, color=f"C{i}", lw=2 if "+" not in method else 1.2)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.set(xlabel="update", ylabel=label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
