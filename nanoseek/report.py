"""The run report: OUT/report.md with PNG plots, written at the end of a speedrun.

Everything here reads plain files the stages already wrote (metrics.jsonl, eval JSON, config.json), so a report can
be rebuilt from a finished run without re-running anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import ModelConfig  # noqa: E402

# DeepSeek-V3 report, Table 1: $2 per H800 GPU-hour, 2.788M GPU-hours for the full training.
DOLLARS_PER_GPU_HOUR = 2.0
V3_GPU_HOURS = 2.788e6
# What one H800 delivers on a bf16 training step at a realistic utilisation (dense peak 989 TFLOP/s, MFU 40%).
H800_EFFECTIVE_FLOPS = 989e12 * 0.40


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interrupt
    return rows


def training_flops(cfg: ModelConfig, tokens: int) -> float:
    """6 * activated parameters * tokens (forward + backward), the usual estimate; attention adds little here."""
    return 6.0 * cfg.num_params()["activated"] * tokens


def cost_line(cfg: ModelConfig, tokens: int, wall_s: float) -> dict:
    flops = training_flops(cfg, tokens)
    gpu_hours = flops / H800_EFFECTIVE_FLOPS / 3600
    return {"wall_s": wall_s, "tokens": tokens, "flops": flops, "gpu_hours": gpu_hours,
            "dollars": gpu_hours * DOLLARS_PER_GPU_HOUR, "fraction_of_v3": gpu_hours / V3_GPU_HOURS}


def plot_kv_cache(cfg: ModelConfig, out: Path) -> Path:
    """Bytes of KV cache per token (bf16): MLA's latent vs an MHA model with the same heads, and V3 for scale."""
    L = cfg.num_hidden_layers
    ours_mla, ours_mha = cfg.kv_cache_elems_per_token * L * 2, cfg.mha_cache_elems_per_token * L * 2
    v3 = ModelConfig.preset("v3")
    v3_mla, v3_mha = v3.kv_cache_elems_per_token * 61 * 2, v3.mha_cache_elems_per_token * 61 * 2
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (title, mla, mha) in zip(axes, [("this model", ours_mla, ours_mha), ("DeepSeek-V3", v3_mla, v3_mha)]):
        bars = ax.bar(["MLA latent", "MHA, same heads"], [mla, mha], color=["#4d6bfe", "#aaaaaa"])
        ax.bar_label(bars, labels=[_bytes(mla), _bytes(mha)])
        ax.set_title(f"KV cache per token: {title} ({mha / mla:.0f}x)")
        ax.set_ylabel("bytes per token (bf16)")
        ax.set_ylim(0, mha * 1.2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_accuracy(evals: dict[str, dict], out: Path, key: str = "pass@1") -> Path:
    names = list(evals)
    vals = [100 * evals[n].get(key, 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bars = ax.bar(names, vals, color="#4d6bfe")
    ax.bar_label(bars, labels=[f"{v:.1f}%" for v in vals])
    ax.set_ylabel(f"held-out greedy {key} (%)")
    ax.set_ylim(0, max(vals + [10]) * 1.25)
    ax.set_title("accuracy after each stage")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curves(rows: list[dict], keys: list[str], out: Path, title: str, ylabel: str = "") -> Path | None:
    rows = [r for r in rows if "step" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        if pts:
            ax.plot(*zip(*pts), label=k)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt_s(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def write_report(out: Path, cfg: ModelConfig, stages: dict[str, dict], evals: dict[str, dict], task: str,
                 tokens: int, wall_s: float) -> Path:
    """stages: name -> {"wall_s", "dir", ...}; evals: stage name -> eval result (pass@1, format_rate, ...)."""
    out = Path(out)
    figs = {}
    figs["kv"] = plot_kv_cache(cfg, out / "kv_cache.png")
    if evals:
        figs["acc"] = plot_accuracy(evals, out / "accuracy.png")
    pre = read_metrics(out / "pretrain" / "metrics.jsonl")
    figs["loss"] = plot_curves(pre, ["loss", "mtp_loss"], out / "pretrain_loss.png", "pretraining loss", "loss")
    figs["imb"] = plot_curves(pre, ["load_imbalance"], out / "expert_imbalance.png",
                              "expert load imbalance (max/mean, mean over MoE layers)", "max/mean")
    grpo = read_metrics(out / "grpo" / "metrics.jsonl")
    figs["reward"] = plot_curves(grpo, ["reward_mean", "accuracy", "format_rate"], out / "grpo_reward.png",
                                 "GRPO: reward and accuracy of sampled completions")
    cost = cost_line(cfg, tokens, wall_s)
    n = cfg.num_params()
    L = cfg.num_hidden_layers
    lines = [
        "# nanoseek speedrun report", "",
        f"Model: `{cfg.model_type}` {L} layers, hidden {cfg.hidden_size}, {cfg.n_routed_experts} routed + "
        f"{cfg.n_shared_experts} shared experts (top-{cfg.num_experts_per_tok}), MTP depth "
        f"{cfg.num_nextn_predict_layers}: {n['total'] / 1e6:.2f}M parameters, {n['activated'] / 1e6:.2f}M activated "
        f"per token. Task: `{task}`.", "",
        "## Held-out accuracy (greedy pass@1 on problems never seen in training)", "",
        "| after | pass@1 | format rate |", "|---|---|---|",
    ]
    for name, ev in evals.items():
        lines.append(f"| {name} | {100 * ev.get('pass@1', 0):.1f}% | {100 * ev.get('format_rate', 0):.1f}% |")
    if "sft" in evals and "grpo" in evals:
        gain = 100 * (evals["grpo"].get("pass@1", 0) - evals["sft"].get("pass@1", 0))
        lines += ["", f"GRPO changed held-out pass@1 by **{gain:+.1f} points** over SFT."]
    if figs.get("acc"):
        lines += ["", "![accuracy](accuracy.png)"]
    lines += ["", "## Stages", "", "| stage | wall time | output |", "|---|---|---|"]
    for name, st in stages.items():
        lines.append(f"| {name} | {_fmt_s(st.get('wall_s', 0))} | `{st.get('dir', '')}` |")
    if figs.get("loss"):
        lines += ["", "## Pretraining", "", "![pretraining loss](pretrain_loss.png)"]
    if (out / "pretrain" / "experts.png").exists():
        lines += ["", "Expert load per layer over training (auxiliary-loss-free bias balancing):", "",
                  "![expert load](pretrain/experts.png)"]
    if figs.get("imb"):
        lines += ["", "![expert imbalance](expert_imbalance.png)"]
    if figs.get("reward"):
        lines += ["", "## GRPO", "", "![GRPO reward](grpo_reward.png)"]
    lines += [
        "", "## KV cache: Multi-head Latent Attention", "",
        f"Per token this model caches {cfg.kv_cache_elems_per_token * L:,} elements "
        f"({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim} per layer) where an MHA model with the same heads caches "
        f"{cfg.mha_cache_elems_per_token * L:,} ({cfg.mha_cache_elems_per_token / cfg.kv_cache_elems_per_token:.1f}x).",
        "", "![KV cache](kv_cache.png)",
        "", "## Cost", "",
        f"Wall time {_fmt_s(wall_s)} on this machine; {tokens:,} training tokens processed "
        f"({cost['flops']:.3g} FLOPs at 6 x activated parameters per token).",
        f"The same work on H800s at 40% MFU: {cost['gpu_hours']:.2e} GPU-hours = ${cost['dollars']:.2e} at "
        f"DeepSeek's ${DOLLARS_PER_GPU_HOUR:.0f}/GPU-hour ({cost['fraction_of_v3']:.1e} of DeepSeek-V3's "
        f"{V3_GPU_HOURS / 1e6:.3f}M GPU-hours, $5.576M).",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
