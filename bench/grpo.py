"""Seconds per GRPO step: nanoseek's trainer vs TRL's GRPOTrainer on the same model, same run.

    .venv/bin/python bench/grpo.py [--preset tiny] [--steps 6] [--prompts 4] [--group 8] [--max-tokens 32] [--compile X]

One random DeepSeek-V3-shaped model (no MTP layer, so both sides hold the same weights) is saved by ns.save with
our tokenizer and loaded by transformers for TRL. Both sides then run GRPO with the same settings: P prompts of
the arithmetic task per step, G completions each (so P*G completions per optimizer step), the same completion
budget, temperature 1, beta 0 (no reference model), loss_type dapo, one iteration per batch, AdamW, float32 on
CPU (TRL: use_cpu=True, bf16=False). Rewards are the same Python function on both sides. A step is sampling +
scoring + the training forward/backward + the optimizer step; the first step (warm-up) is not counted and the
median of the others is reported. ratio = TRL seconds per step / ours. `--compile true`: our rollouts decode through
the compiled graph (infer/compiled.py) and our training forward runs as one compiled graph (rl.compiled_group_logprobs),
as a long run's do; their compile time falls in the uncounted first step.

`--shape llama-135m` (instead of a preset): a llama model of SmolLM-135M's widths (hidden 576, 9 heads over 3
key/value heads, intermediate 1536, vocabulary 49,152, tied embeddings, 30 layers; `--layers N` keeps N of them),
random weights. Our tokenizer (trained on the task corpus) holds fewer ids than the 49,152 rows: the extra ids
decode to nothing on both sides, so rewards see shorter texts, equally for both. Each side's run notes the load
average (os.getloadavg, 1 minute) before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

# real widths of small published models, random weights (llama-135m: SmolLM-135M's config.json)
SHAPES = {
    "llama-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=True),
}


def build(preset: str, folder: Path, seed: int = 0, shape: str | None = None, layers: int | None = None):
    import nanoseek as ns
    from nanoseek.data.tasks import corpus_documents
    from nanoseek.tokenizer import Tokenizer

    cfg = ns.ModelConfig(**SHAPES[shape]) if shape else ns.ModelConfig.preset(preset)
    if layers:
        cfg = cfg.replace(num_hidden_layers=layers)
    tok = Tokenizer.train(list(corpus_documents(2000)), min(cfg.vocab_size, 4096), progress=False)
    if shape:   # the shape's vocabulary rows, the tokenizer's special ids
        cfg = cfg.replace(vocab_size=max(cfg.vocab_size, tok.vocab_size), bos_token_id=tok.bos_id,
                          eos_token_id=tok.eos_id)
    else:
        cfg = cfg.replace(vocab_size=tok.vocab_size)
    torch.manual_seed(seed)
    model = ns.Transformer(cfg.replace(num_nextn_predict_layers=0))
    ns.save(model, folder, tokenizer=tok)
    return folder, model.cfg, sum(p.numel() for p in model.parameters())


def digit_reward_ours(problems, texts, task):
    return [sum(c.isdigit() for c in t) / max(1, len(t)) for t in texts]


def digit_reward_trl(prompts, completions, **kw):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]   # conversational: messages
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


def run_ours(folder: Path, out: Path, args) -> list[float]:
    from nanoseek.train.grpo import GRPOConfig, grpo
    cfg = GRPOConfig(model=str(folder), task="arithmetic", out=str(out), steps=args.steps,
                     prompts_per_step=args.prompts, group_size=args.group, max_tokens=args.max_tokens,
                     temperature=1.0, lr=1e-5, beta=0.0, loss_type="dapo", num_iterations=1, dynamic_sampling=False,
                     mask_truncated=False, save_every=10**9, sample_every=0, progress=False,
                     micro_batch=args.prompts * args.group, compile=args.compile)
    grpo(cfg, reward_funcs=[digit_reward_ours])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_s"] for r in rows]


def run_trl(folder: Path, out: Path, args) -> list[float]:
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.data.split import draw_problems, train_rng
    from nanoseek.data.tasks import get_task

    task = get_task("arithmetic")
    n = args.prompts * (args.steps + 1)
    problems = draw_problems(task, train_rng(0, "bench"), 1, n)
    ds = Dataset.from_list([{"prompt": task.messages(p)} for p in problems])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token
    cfg = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, max_steps=args.steps,
                     per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
                     max_completion_length=args.max_tokens, temperature=1.0, learning_rate=1e-5, beta=0.0,
                     loss_type="dapo", num_iterations=1, report_to=[], save_strategy="no", logging_steps=1,
                     seed=0, dataloader_num_workers=0, disable_tqdm=True,
                     **({} if args.trl_checkpointing is None else {"gradient_checkpointing": bool(args.trl_checkpointing)}))
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    trainer = GRPOTrainer(model=model, reward_funcs=[digit_reward_trl], args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="a real-width model instead of a preset")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--compile", default="auto", help="our rollouts' compiled decode step and compiled training "
                    "forward: true, false or auto (GRPO's rules: rollouts when steps x max-tokens reach 4,000 on the "
                    "CPU, the training forward from 2,000 steps; a short bench stays eager)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--trl-checkpointing", type=int, choices=(0, 1), default=None,
                    help="TRL's gradient_checkpointing (default: TRL's own default, on since TRL 1.x; ours has none)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loads = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        folder, cfg, n_params = build(args.preset, d / "model", shape=args.shape, layers=args.layers)
        loads.append(os.getloadavg()[0])
        ours = run_ours(folder, d / "ours", args)
        loads.append(os.getloadavg()[0])
        trl = run_trl(folder, d / "trl", args)
        loads.append(os.getloadavg()[0])
    o, t = statistics.median(ours[1:]), statistics.median(trl[1:])
    what = f"{args.shape} shape ({cfg.model_type}, {cfg.num_hidden_layers} layers)" if args.shape else \
        f"{args.preset} preset"
    print(f"GRPO step, {what}, {n_params / 1e6:.1f}M parameters, {args.prompts} prompts x {args.group} "
          f"completions, <= {args.max_tokens} tokens, {torch.get_num_threads()} thread(s)")
    print(f"  nanoseek : {o:7.3f} s/step   (steps: {', '.join(f'{x:.2f}' for x in ours)})")
    print(f"  TRL      : {t:7.3f} s/step   (steps: {', '.join(f'{x:.2f}' for x in trl)})")
    print(f"  ratio TRL / nanoseek = {t / o:.2f}x   (load average before ours / before TRL / after: "
          f"{' / '.join(f'{x:.2f}' for x in loads)})")


if __name__ == "__main__":
    main()
