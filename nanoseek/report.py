"""The run report: OUT/report.md with PNG plots, written at the end of a speedrun.

Everything here reads plain files the stages already wrote (metrics.jsonl, eval JSON, config.json), so a report can
be rebuilt from a finished run without re-running anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import plots  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .data.jsonl import read_jsonl  # noqa: E402

# DeepSeek-V3 report, Table 1: $2 per H800 GPU-hour, 2.788M GPU-hours for the full training.
DOLLARS_PER_GPU_HOUR = 2.0
V3_GPU_HOURS = 2.788e6
# What one H800 delivers on a bf16 training step at a realistic utilisation (dense peak 989 TFLOP/s, MFU 40%).
H800_EFFECTIVE_FLOPS = 989e12 * 0.40


def training_flops(cfg: ModelConfig, tokens: int) -> float:
    """6 * activated parameters * tokens (forward + backward), the usual estimate; attention adds little here."""
    return 6.0 * cfg.num_params()["activated"] * tokens


def cost_line(cfg: ModelConfig, tokens: int, wall_s: float) -> dict:
    flops = training_flops(cfg, tokens)
    gpu_hours = flops / H800_EFFECTIVE_FLOPS / 3600
    return {"wall_s": wall_s, "tokens": tokens, "flops": flops, "gpu_hours": gpu_hours,
            "dollars": gpu_hours * DOLLARS_PER_GPU_HOUR, "fraction_of_v3": gpu_hours / V3_GPU_HOURS}


def format_bytes(n: float) -> str:
    """A byte count as people read it: "640 B", "2.5 KiB", "68.6 KiB", "4.8 MiB" (binary units, at most one
    decimal, none when the value is whole)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            break
        n /= 1024
    text = f"{n:,.1f}"
    return f"{text.removesuffix('.0')} {unit}"


def byte_unit(largest: float) -> tuple[str, int]:
    """The unit to draw an axis of byte counts in (up to `largest`): its name and size in bytes."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if largest >= 2 * size:
            return unit, size
    return "B", 1


def plot_kv_cache(cfg: ModelConfig, out: Path) -> Path:
    """Bytes of KV cache per token (bf16): this model's cache (MLA's latent, or GQA's grouped K/V for the dense
    families) vs an MHA model with the same heads, and V3 for scale."""
    v3 = ModelConfig.preset("v3")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (title, c) in zip(axes, [("this model", cfg), ("DeepSeek-V3", v3)]):
        L = c.num_hidden_layers
        mla, mha = c.kv_cache_elems_per_token * L * 2, c.mha_cache_elems_per_token * L * 2
        unit, size = byte_unit(mha)   # plain numbers in one unit on the axis: no 1e6 offset
        ours = "MLA latent" if c.attention == "mla" else f"GQA K/V ({c.num_key_value_heads} kv heads)"
        bars = ax.bar([ours, "MHA, same heads"], [mla / size, mha / size], color=["#4d6bfe", "#aaaaaa"])
        ax.bar_label(bars, labels=[format_bytes(mla), format_bytes(mha)])
        ax.set_title(f"KV cache per token: {title} ({mha / mla:.0f}x)")
        ax.set_ylabel(f"{'bytes' if unit == 'B' else unit} per token (bf16)")
        ax.set_ylim(0, mha / size * 1.2)
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
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


# metrics.jsonl keys -> what a plot's legend says
LABELS = {"loss": "next-token loss", "mtp_loss": "MTP loss", "load_imbalance": "max / mean expert load"}


def plot_curves(rows: list[dict], keys: list[str], out: Path, title: str, ylabel: str) -> Path | None:
    """One curve per key against step: each logged value as a faint line, a moving average over it as the
    readable one (noisy per-step values hide their trend otherwise); the legend sits outside the axes so it never
    covers the data."""
    rows = [r for r in rows if isinstance(r, dict) and "step" in r]
    curves = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in keys}
    curves = {k: pts for k, pts in curves.items() if pts}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    window = 1
    for color, (k, pts) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], curves.items()):
        steps, values = zip(*pts)
        window = max(1, len(values) // 25)
        if window > 1:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, plots.moving_average(list(values), window), color=color, linewidth=1.8,
                label=LABELS.get(k, k))
    if all(0 <= v <= 1 for pts in curves.values() for _, v in pts):
        ax.set_ylim(-0.03, 1.03)   # rates and rewards in [0, 1]: the whole scale, so a flat run reads as flat
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              title=f"mean of the last {window} steps\n(faint: each step)" if window > 1 else None)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt_s(s: float) -> str:
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def stage_table(stages: dict[str, dict]) -> list[str]:
    """The report's stage table (markdown lines): every stage the run recorded, eval stages included, in run order,
    with the torch threads it ran with and the machine's load average when it finished: a stage that is slow on a
    busy machine is not a slow stage."""
    lines = ["| stage | wall time | torch threads | machine load (1 min) | result | output |",
             "|---|---|---|---|---|---|"]
    for name, st in stages.items():
        threads = st.get("threads", "-")
        load = f"{st['load_avg']:.1f}" if isinstance(st.get("load_avg"), (int, float)) else "-"
        res = st.get("result") if isinstance(st.get("result"), dict) else {}
        result = f"pass@1 {100 * res['pass@1']:.1f}%" if "pass@1" in res else ""
        lines.append(f"| {name} | {_fmt_s(st.get('wall_s', 0))} | {threads} | {load} | {result} | "
                     f"`{st.get('dir', '')}` |")
    return lines


def machine_line() -> str:
    """Where the report was written: CPU cores and the load average then (other work shares a machine)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"Machine: {os.cpu_count()} CPU cores; load average (1, 5, 15 min) {load} when this report was written."


def make_plots(out: Path, cfg: ModelConfig, evals: dict[str, dict]) -> dict[str, Path | None]:
    """Every PNG of the report, from the files the stages wrote (missing metrics: no plot)."""
    pre = read_jsonl(out / "pretrain" / "metrics.jsonl")
    grpo = read_jsonl(out / "grpo" / "metrics.jsonl")
    return {
        "kv": plot_kv_cache(cfg, out / "kv_cache.png"),
        "acc": plot_accuracy(evals, out / "accuracy.png") if evals else None,
        "loss": plot_curves(pre, ["loss", "mtp_loss"], out / "pretrain_loss.png", "pretraining loss",
                            "cross-entropy (nats per token)"),
        "imb": plot_curves(pre, ["load_imbalance"], out / "expert_imbalance.png",
                           "expert load imbalance (mean over MoE layers)", "max / mean tokens per expert"),
        "reward": plots.reward_plot([r for r in grpo if isinstance(r, dict) and "step" in r],
                                    out / "grpo_reward.png"),   # the GRPO run's own reward plot
    }


def write_report(out: Path, cfg: ModelConfig, stages: dict[str, dict], evals: dict[str, dict], task: str,
                 tokens: int, wall_s: float) -> Path:
    """stages: name -> {"wall_s", "dir", "threads", "load_avg", "result"...} (OUT/stages.json of the speedrun);
    evals: stage name -> eval result (pass@1, format_rate, ...)."""
    out = Path(out)
    figs = make_plots(out, cfg, evals)
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
    lines += ["", "## Stages", "", *stage_table(stages), "", machine_line()]
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
