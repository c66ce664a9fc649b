"""The plots of experiment 3 (see divergences.py), drawn from its results dict."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {
    "forward_kl": "tab:blue", "sft": "tab:cyan", "jsd_0.1": "tab:olive", "jsd_0.5": "tab:green",
    "jsd_0.9": "tab:pink", "reverse_kl": "tab:red", "pg": "tab:orange",
    "pg_discount_0": "tab:orange", "pg_discount_0.5": "tab:brown",
    "pg_discount_0.9": "tab:purple", "pg_discount_1": "black", "warm_start": "tab:gray",
}  # fmt: skip


def _bars(ax, arms: dict, key: str, title: str, extra: dict | None = None) -> None:
    names = list(arms)
    for i, name in enumerate(names):
        r = arms[name]
        ax.bar(i, r["mean"][key], color=COLORS.get(name, "gray"), alpha=0.6)
        ax.plot([i] * len(r["seeds"]), [s[key] for s in r["seeds"]], "k.", ms=4)
        if extra and name in extra:
            ax.plot([i] * len(extra[name]["seeds"]), [s[key] for s in extra[name]["seeds"]],
                    "rx", ms=6)  # fmt: skip
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_title(title, fontsize=9)


def plot_bimodal(results: dict, path: Path) -> None:
    arms, floor = results["parts"]["3a"], results["parts"].get("3a-floor")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), width_ratios=[1.4, 1, 1])
    ax = axes[0]
    example = next(iter(arms.values()))["seeds"][0]["example"]
    ax.fill_between(range(len(example["teacher"][0])), example["teacher"][0], color="0.8",
                    label="teacher")  # fmt: skip
    for name in ("forward_kl", "jsd_0.5", "reverse_kl", "pg"):
        if name in arms:
            ax.plot(arms[name]["seeds"][0]["example"]["student"][0], color=COLORS[name],
                    label=name)  # fmt: skip
    ax.set_title("one prompt (seed 0): teacher and students", fontsize=9)
    ax.set_xlabel("answer id")
    ax.legend(fontsize=7)
    _bars(axes[1], arms, "precision", "precision: student mass where p_T >= 1e-3", floor)
    _bars(axes[2], arms, "coverage", "teacher modes with >= 10% of student mass", floor)
    axes[2].set_ylim(0, 2.1)
    if floor:
        axes[2].plot([], [], "rx", label="teacher floor 1e-3")
        axes[2].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_strings(results: dict, path: Path) -> None:
    fact, ar = results["parts"].get("3b-fact"), results["parts"].get("3b-ar")
    panels = (2 if fact else 0) + (1 if ar else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.4), squeeze=False)
    axes = list(axes[0])
    if fact:
        _bars(axes.pop(0), fact, "precision", "factorised: precision (Hamming <= 1)")
        _bars(axes.pop(0), fact, "marginal_entropy", "factorised: entropy per position / log 8")
    if ar:
        ax = axes.pop(0)
        for name, r in ar.items():
            xs, ys = [s["recall"] for s in r["seeds"]], [s["precision"] for s in r["seeds"]]
            ax.plot(xs, ys, "o", color=COLORS.get(name, "gray"), label=name, alpha=0.8)
            for x, y, seed in zip(xs, ys, r["seeds"], strict=True):
                if seed.get("empty_frac", 0) > 0.2:
                    ax.annotate(f"{seed['empty_frac']:.0%} empty", (x, y), fontsize=7,
                                xytext=(6, 4), textcoords="offset points")  # fmt: skip
        ax.set_xlabel("recall (strings hit / 8)")
        ax.set_ylabel("precision")
        ax.set_title("autoregressive (kdrl loop): each dot a seed", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_all(results: dict, out: Path) -> list[Path]:
    paths = []
    if "3a" in results["parts"]:
        paths.append(out / "divergences-3a.png")
        plot_bimodal(results, paths[-1])
    if {"3b-fact", "3b-ar"} & set(results["parts"]):
        paths.append(out / "divergences-3b.png")
        plot_strings(results, paths[-1])
    return paths
