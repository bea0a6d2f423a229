"""The figures of a distill run: training curves and the before/after re-measure."""

from __future__ import annotations

from pathlib import Path

CURVES = (("divergence", "divergence (per token)"), ("agree", "teacher–student top-1 agreement"),
          ("entropy", "student entropy (nats)"), ("resp_len", "response length (tokens)"),
          ("grad_norm", "gradient norm (before clipping)"), ("lr", "learning rate"))


def plot_curves(history: list[dict], path: Path, *, evals: list[dict] | None = None,
                best_step: int | None = None) -> None:
    """The training curves; with evaluations (--eval-every), two more panels: held-out accuracy per view with
    the kept step marked, and the gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(2, 4 if evals else 3, figsize=(17 if evals else 13, 6.5))
    panels = list(axes.flat)
    for ax, (key, title) in zip(panels, CURVES, strict=False):
        ys = [h.get(key) for h in history]
        ax.plot(steps, [float("nan") if y is None else y for y in ys], lw=1.2)
        ax.set_title(title, fontsize=10)
    if evals:
        at = [e["step"] for e in evals]
        acc, gap = panels[len(CURVES)], panels[len(CURVES) + 1]
        for key, label, colour in (("acc_full", "full", "#2b6cb0"), ("acc_crop", "crop", "#c05621"),
                                   ("acc_box", "box", "#9aa5b1"), ("mean_full_crop", "mean of full and crop", "black")):
            ys = [100 * e[key] if e.get(key) is not None else float("nan") for e in evals]
            acc.plot(at, ys, marker="o", ms=3, lw=1.2, label=label, color=colour,
                     ls="--" if key == "mean_full_crop" else "-")
        if best_step is not None:
            acc.axvline(best_step, color="green", lw=1, ls=":", label=f"kept: step {best_step}")
        acc.set_title(f"held-out accuracy % (n={evals[-1].get('n')})", fontsize=10)
        acc.legend(fontsize=7)
        gap.plot(at, [100 * e["gap"] for e in evals], marker="o", ms=3, lw=1.2, color="#6b46c1")
        gap.axhline(0, color="black", lw=0.6)
        gap.set_title("held-out gap = crop − full (points)", fontsize=10)
    for ax in panels:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_before_after(table, path: Path) -> None:
    """Accuracy per view and the gap, before vs after, for each benchmark's `all` category; error bars are the
    paired 95% CI of the change, drawn on the `after` bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = table[table["category"] == "all"]
    benches = list(dict.fromkeys(rows["benchmark"]))
    metrics = [m for m in ("acc_full", "acc_crop", "acc_box", "gap") if m in set(rows["metric"])]
    fig, axes = plt.subplots(1, max(1, len(benches)), figsize=(1.9 * len(metrics) + 2, 4.2), squeeze=False)
    for ax, bench in zip(axes[0], benches, strict=False):
        part = rows[rows["benchmark"] == bench].set_index("metric")
        x = np.arange(len(metrics))
        before = [100 * part.loc[m, "before"] for m in metrics]
        after = [100 * part.loc[m, "after"] for m in metrics]
        lo = [100 * (part.loc[m, "delta"] - part.loc[m, "ci_low"]) for m in metrics]
        hi = [100 * (part.loc[m, "ci_high"] - part.loc[m, "delta"]) for m in metrics]
        ax.bar(x - 0.2, before, 0.4, label="before", color="#9aa5b1")
        ax.bar(x + 0.2, after, 0.4, label="after", color="#2b6cb0", yerr=[lo, hi], capsize=3)
        for i, m in enumerate(metrics):
            d = 100 * part.loc[m, "delta"]
            top = max(after[i] + hi[i], before[i], 0)
            ax.annotate(f"{d:+.1f}", (x[i], top + 3), ha="center", fontsize=8, fontweight="bold")
        ax.set_ylim(min(0, *before, *(a - lo_ for a, lo_ in zip(after, lo, strict=True))) - 5,
                    max(100, *before, *after) + 12)
        ax.set_xticks(x, [m.replace("acc_", "") for m in metrics])
        ax.set_ylabel("%")
        ax.set_title(f"{bench} (n={int(part['n'].max())})", fontsize=10)
        ax.axhline(0, color="black", lw=0.6)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
