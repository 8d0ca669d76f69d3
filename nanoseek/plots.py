"""The per-run plots, from the rows of a run's metrics.jsonl (PNG, matplotlib's Agg backend: no display needed).

    pretrain_plots(out, rows)    OUT/loss.png (loss, MTP loss) and OUT/experts.png (load of each expert per layer)
    reward_plot(rows, path)      OUT/reward.png of a GRPO run (reward and accuracy, smoothed over faint raw points)
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def moving_average(ys: list[float], k: int) -> list[float]:
    """Trailing mean over the last k values (fewer at the start); NaN values are skipped."""
    out = []
    for i in range(len(ys)):
        window = [y for y in ys[max(0, i - k + 1):i + 1] if y == y]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


def pretrain_plots(out: Path, rows: list[dict]) -> None:
    """OUT/loss.png (loss and MTP loss per step) and OUT/experts.png (per MoE layer: each expert's share of the
    tokens over training, as load / mean load; a balanced router is a flat 1.0)."""
    if not rows:
        return
    import numpy as np

    plt = _pyplot()
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], label="loss (next token)")
    if any(r.get("mtp_loss") for r in rows):
        ax.plot(steps, [r["mtp_loss"] for r in rows], label="MTP loss (token after next)", alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    loads = [r.get("expert_load") or [] for r in rows]
    n_layers = max((len(x) for x in loads), default=0)
    if n_layers == 0:
        return
    fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.2 + 1.8 * n_layers), squeeze=False)
    for li in range(n_layers):
        mat = np.array([x[li] for x in loads if len(x) > li], dtype=np.float64)  # (steps, experts)
        mat = mat / np.maximum(mat.mean(1, keepdims=True), 1e-9)
        ax = axes[li, 0]
        im = ax.imshow(mat.T, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, mat.shape[1] - 0.5))
        ax.set_ylabel(f"MoE layer {li}\nexpert")
        fig.colorbar(im, ax=ax, label="load / mean")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("expert load per layer (1.0 = balanced)")
    fig.tight_layout()
    fig.savefig(out / "experts.png", dpi=120)
    plt.close(fig)


REWARD_CURVES = (("reward_mean", "reward (weighted sum)", "#4d6bfe"), ("accuracy", "accuracy (answer correct)",
                                                                       "#e07b39"))


def reward_plot(rows: list[dict], path: Path) -> Path | None:
    """OUT/reward.png: mean reward and accuracy of each GRPO step's samples on training prompts. Raw values as faint
    points, a moving average (window ~1/20 of the run) as the line; the legend sits below the axes, off the data."""
    if not rows:
        return None
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    k = max(1, len(rows) // 20)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    top = 1.0
    for key, label, color in REWARD_CURVES:
        ys = [float(r[key]) if r.get(key) is not None else float("nan") for r in rows]
        top = max([top] + [y for y in ys if y == y])      # a weighted reward may pass 1 (accuracy + format)
        ax.scatter(steps, ys, s=6, color=color, alpha=0.25, linewidths=0)
        ax.plot(steps, moving_average(ys, k), color=color, label=f"{label}, mean of {k} steps" if k > 1 else label)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("fraction of completions / mean reward")
    ax.set_ylim(-0.05, top + 0.05)
    ax.grid(alpha=0.3)
    ax.set_title("GRPO: reward and accuracy on training prompts")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
