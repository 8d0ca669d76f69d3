"""`nanoseek sft`: supervised fine-tuning on chat conversations (DeepSeek-R1's cold start; distillation's student).

Data: a jsonl file of {"messages": [{"role", "content"[, "reasoning_content"]}, ...]} (reasoning_content on an
assistant turn is rendered inside <think>...</think> by the tokenizer's chat template), or --task NAME, whose
generator writes problems with worked, step-by-step solutions.

Loss on assistant tokens only: each conversation is rendered with tok.apply_chat_template and cut into the text
before each assistant turn (system, user and template tokens: masked) and the assistant's own tokens (reasoning,
answer and the closing EOS: trained). Examples are packed several per row; a block-diagonal causal mask and
positions that restart at each example keep them from seeing one another, exactly as if each ran alone.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .loop import make_config

IGNORE = -100

# The cpu speedrun's SFT stage (keys are CLI flags; measured in docs/benchmarks.md, "Post-training calibration").
# Linear equations at level 1: worked solutions of ~38 tokens, which the pretrained 1.3M model already partly knows
# (31% held-out greedy pass@1). A deliberately short SFT (20 steps of 16 x 256 packed tokens, still in warmup) lifts
# that to 37% and leaves GRPO room: 60 steps reach 60%, and pass@8 at T=0.7 is ~91%.
SPEEDRUN_DEFAULTS: dict = {"task": "linear", "difficulty": 1, "steps": 20, "lr": 1e-3, "batch_size": 16,
                           "seq_len": 256}


# ---------------------------------------------------------------------------------------------------- rendering
def render(tok, messages: list[dict]) -> list[tuple[list[int], list[bool]]]:
    """A conversation -> [(token ids, trained mask)]: one example, or one per assistant turn when the template
    renders earlier turns differently from the last one (R1-style templates drop the reasoning of past turns).

    The trained mask is True exactly on the assistant's tokens (reasoning, answer, EOS); everything the template
    adds around them and every system/user token is False.
    """
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        return []
    pieces: list[tuple[str, bool]] = []
    consistent = True
    done = ""
    for i in turns:
        prefix = tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False, tokenize=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            consistent = False
            break
        pieces += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    if consistent:
        return [_encode_pieces(tok, pieces)]
    out = []  # one example per assistant turn, each trained on its last turn only
    for i in turns:
        prefix = tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False, tokenize=False)
        if not full.startswith(prefix):
            raise UsageError("the chat template renders an assistant turn in a way that does not extend its "
                             "generation prompt; cannot tell the assistant's tokens apart")
        out.append(_encode_pieces(tok, [(prefix, False), (full[len(prefix):], True)]))
    return out


def _encode_pieces(tok, pieces):
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in pieces:
        if not text:
            continue
        t = tok.encode(text)
        ids += t
        mask += [trained] * len(t)
    return ids, mask


def task_messages(task, problem) -> list[dict]:
    """The chat prompt of a problem followed by its worked solution as the assistant's answer.

    task.worked_solution(problem) is "<think>reasoning</think>answer"; split into reasoning_content and content
    so the template renders it the way the model will produce it at inference time.
    """
    sol = task.worked_solution(problem)
    msg = {"role": "assistant", "content": sol}
    if "<think>" in sol and "</think>" in sol:
        reasoning = sol.split("<think>", 1)[1].split("</think>", 1)[0]
        msg = {"role": "assistant", "reasoning_content": reasoning.strip("\n"),
               "content": sol.split("</think>", 1)[1].strip("\n")}
    return task.messages(problem) + [msg]


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """{"messages": [...]} per line -> conversations; UsageError listing every malformed line number."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file (expected a jsonl file of {{\"messages\": [...]}} lines)")
    convs, bad = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                msgs = d["messages"]
                ok = (isinstance(msgs, list) and msgs and all(
                    isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content", ""), str) and isinstance(m.get("reasoning_content", ""), str)
                    for m in msgs) and any(m["role"] == "assistant" for m in msgs))
            except (json.JSONDecodeError, KeyError, TypeError):
                ok = False
            if ok:
                convs.append(msgs)
            else:
                bad.append(n)
    if bad:
        shown = ", ".join(map(str, bad[:20])) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise UsageError(f"{path}: malformed line(s) {shown}: each line must be a JSON object "
                         f"{{\"messages\": [{{\"role\": \"user\"|\"assistant\"|\"system\", \"content\": str}}, ...]}} "
                         f"with at least one assistant message")
    if not convs:
        raise UsageError(f"{path}: no conversations found")
    return convs


# ---------------------------------------------------------------------------------------------------- packing
@dataclass
class Batch:
    input_ids: torch.Tensor   # (B, T)
    targets: torch.Tensor     # (B, T), IGNORE where not trained
    positions: torch.Tensor   # (B, T), restarting at 0 for each packed example
    segments: torch.Tensor    # (B, T), example index within the row, -1 for padding

    @property
    def trained_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


def plan_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Greedy packing in order: indices of the examples that share each row (each row <= seq_len tokens)."""
    rows, cur, used = [], [], 0
    for i, L in enumerate(lengths):
        L = min(L, seq_len)
        if cur and used + L > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += L
    if cur:
        rows.append(cur)
    return rows


def pack(rows: list[list[tuple[list[int], list[bool]]]], seq_len: int, pad_id: int = 0) -> Batch:
    """Rows of examples -> a Batch of len(rows) x seq_len (next-token targets inside each example only).

    An example of L tokens occupies L positions (its last token predicts nothing); longer than seq_len: truncated.
    """
    B = len(rows)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    tgt = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, seq_len), dtype=torch.long)
    seg = torch.full((B, seq_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for s, (x, m) in enumerate(row):
            x, m = x[:seq_len - col], m[:seq_len - col]
            L = len(x)
            ids[r, col:col + L] = torch.tensor(x, dtype=torch.long)
            if L > 1:  # target of position j is token j+1, trained when token j+1 is an assistant token
                t = torch.tensor(x[1:], dtype=torch.long)
                t[~torch.tensor(m[1:], dtype=torch.bool)] = IGNORE
                tgt[r, col:col + L - 1] = t
            pos[r, col:col + L] = torch.arange(L)
            seg[r, col:col + L] = s
            col += L
    return Batch(ids, tgt, pos, seg)


class SegmentMask:
    """Cache-protocol stand-in (see MLA.forward) that stores nothing and returns the block-diagonal causal mask of
    packed rows: a token attends to earlier tokens of its own example only."""

    def __init__(self, segments: torch.Tensor):
        T = segments.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
        self.mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]   # (B, 1, T, T)

    def update(self, layer, c_kv, k_pe):
        return c_kv, k_pe, self.mask

    def advance(self):
        pass


def sft_losses(model, batch: Batch, mtp_lambda: float = 0.0) -> dict:
    """Next-token cross-entropy on trained tokens (+ MTP loss, + the MoE balance loss) for a packed batch."""
    mask = SegmentMask(batch.segments)
    logits, h = model(batch.input_ids, positions=batch.positions, cache=mask, return_hidden=True)
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V).float(), batch.targets.reshape(-1), ignore_index=IGNORE)
    out = {"loss": loss, "mtp_loss": logits.new_zeros(())}
    if mtp_lambda and len(getattr(model, "mtp", ())):
        # depth 0 at position i sees h_i and token i+1 and predicts token i+2 (V3 eq. 21-25), inside one example
        T = batch.input_ids.shape[1] - 1
        same = batch.segments[:, 1:] == batch.segments[:, :-1]
        labels = batch.targets[:, 1:].masked_fill(~same, IGNORE)
        m_logits, _ = model.mtp_forward(h[:, :T], batch.input_ids[:, 1:], positions=batch.positions[:, :T],
                                        cache=SegmentMask(batch.segments[:, :T]), depth=0)
        if (labels != IGNORE).any():
            out["mtp_loss"] = F.cross_entropy(m_logits.reshape(-1, V).float(), labels.reshape(-1),
                                              ignore_index=IGNORE)
    bl = [m.balance_loss for m in model.moe_layers() if m.balance_loss is not None]
    out["balance_loss"] = torch.stack(bl).sum() if bl else logits.new_zeros(())
    return out


class ExampleStream:
    """The packed batch of optimizer step `step`, a pure function of (seed, step): resuming needs no data state.

    File data: each epoch is a fresh seeded shuffle of the rendered conversations, packed into rows in that order;
    step s takes rows [s * rows, (s + 1) * rows) of the epochs laid end to end. Task data: each step draws new
    training-split problems from its own seed until its rows are full.
    """

    def __init__(self, tok, seed: int, rows: int, seq_len: int, convs=None, task=None, difficulty: int = 1):
        self.tok, self.seed, self.rows, self.seq_len = tok, seed, rows, seq_len
        self.task, self.difficulty = task, difficulty
        self.examples = [ex for c in convs for ex in render(tok, c)] if convs is not None else None
        if self.examples is not None and not self.examples:
            raise UsageError("no trainable examples: no conversation has an assistant message")
        self._epochs: list[list[list[int]]] = []    # per epoch: rows of example indices

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            order = list(range(len(self.examples)))
            random.Random(f"sft:{self.seed}:{len(self._epochs)}").shuffle(order)
            plan = plan_rows([len(self.examples[i][0]) for i in order], self.seq_len)
            self._epochs.append([[order[j] for j in row] for row in plan])
        return self._epochs[epoch]

    def batch(self, step: int) -> Batch:
        if self.examples is not None:
            rows, r, epoch = [], step * self.rows, 0
            while r >= len(self._epoch_rows(epoch)):
                r -= len(self._epoch_rows(epoch))
                epoch += 1
            while len(rows) < self.rows:
                er = self._epoch_rows(epoch)
                rows.append([self.examples[i] for i in er[r]])
                r += 1
                if r == len(er):
                    r, epoch = 0, epoch + 1
            return pack(rows, self.seq_len, pad_id=self.tok.pad_id or 0)
        from ..eval import draw_problems, train_rng
        rng = train_rng(self.seed, "sft", step)
        rows, cur, used = [], [], 0
        while True:
            p = draw_problems(self.task, rng, self.difficulty, 1, split="train")[0]
            for ex in render(self.tok, task_messages(self.task, p)):
                L = min(len(ex[0]), self.seq_len)
                if cur and used + L > self.seq_len:
                    rows.append(cur)
                    cur, used = [], 0
                    if len(rows) == self.rows:
                        return pack(rows, self.seq_len, pad_id=self.tok.pad_id or 0)
                cur.append(ex)
                used += L


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class SFTConfig:
    model: str = ""                 # model folder to fine-tune (with tokenizer.json)
    out: str = ""
    data: str | None = None         # jsonl of {"messages": [...]}
    task: str | None = None         # or: a task's worked solutions, generated fresh every step
    difficulty: int | None = None   # task difficulty (None: the task's default)
    steps: int = 300
    batch_size: int = 16            # packed rows per optimizer step
    seq_len: int = 512              # tokens per row
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3         # weight of the MTP loss (V3 uses 0.3 early in training), when the model has MTP
    bias_update_speed: float = 0.0  # V3's routing-bias gamma; 0 keeps the pretrained routing as it is
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    stop_after: int = 0             # stop (with a checkpoint) after this step, as if interrupted
    progress: bool = True


def _check_out(out: Path, resume: bool):
    if not str(out):
        raise UsageError("--out is required")
    if not resume and ((out / "metrics.jsonl").exists() or (out / "final").exists() or (out / "ckpt").exists()):
        raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose another --out")


def load_model_and_tokenizer(folder: str | Path):
    """A model folder -> (model, tokenizer), with UsageError for a missing folder or tokenizer."""
    from ..checkpoint import load
    from ..tokenizer import Tokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"model folder {folder} does not exist")
    if not (folder / "tokenizer.json").exists():
        raise UsageError(f"{folder} has no tokenizer.json: post-training needs the model's tokenizer in its folder "
                         f"(save the model with ns.save(model, folder, tokenizer=tok), or copy tokenizer*.json there)")
    return load(folder), Tokenizer.load(folder)


# ---------------------------------------------------------------------------------------------------- training
def sft(cfg: SFTConfig | dict, model=None, tokenizer=None) -> Path:
    """Fine-tune and return OUT/final (a model folder with the tokenizer). `model`/`tokenizer` given: train
    them in place (distillation's fresh student), else load cfg.model."""
    from ..data.tasks import get_task
    from ..model import update_bias
    from . import loop

    if isinstance(cfg, dict):
        cfg = SFTConfig(**cfg)
    out = Path(cfg.out)
    _check_out(out, cfg.resume)
    if (cfg.data is None) == (cfg.task is None):
        raise UsageError("pass exactly one of --data FILE.jsonl or --task NAME")
    task = get_task(cfg.task) if cfg.task else None
    convs = read_jsonl(cfg.data) if cfg.data else None
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
    difficulty = cfg.difficulty if cfg.difficulty is not None else getattr(task, "default_difficulty", 1)
    stream = ExampleStream(tokenizer, cfg.seed, cfg.batch_size, cfg.seq_len, convs=convs, task=task,
                           difficulty=difficulty)
    torch.manual_seed(cfg.seed)
    model.float().train()
    opt = torch.optim.AdamW(loop.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    step, tokens_seen = 0, 0
    ckpt = loop.find_resume_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        loop.load_model_weights(ckpt, model)
        doc = loop.load_trainer_state(ckpt, model, opt)
        step, tokens_seen = doc["step"], doc["state"].get("tokens_seen", 0)
        print(f"[sft] resuming from {ckpt} (step {step})")
    out.mkdir(parents=True, exist_ok=True)
    logger = loop.MetricsLogger(out / "metrics.jsonl", resume_step=step if ckpt else None)
    mtp_lambda = cfg.mtp_lambda if len(model.mtp) else 0.0
    bar = loop.progress(cfg.steps, step, "sft", cfg.progress)

    def save(at):
        loop.save_checkpoint(out, at, model, model, opt, tokenizer=tokenizer, keep=cfg.keep_checkpoints,
                             state={"tokens_seen": tokens_seen, "config": vars(cfg)})

    with loop.StopOnSigint() as stop:
        while step < cfg.steps:
            t0 = time.time()
            batch = stream.batch(step)
            lr = loop.lr_at(step, total=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, schedule=cfg.schedule,
                            min_lr_ratio=cfg.min_lr_ratio)
            loop.set_lr(opt, lr)
            opt.zero_grad(set_to_none=True)
            parts = sft_losses(model, batch, mtp_lambda)
            total = parts["loss"] + mtp_lambda * parts["mtp_loss"] + parts["balance_loss"]
            total.backward()
            grad_norm = loop.clip_grad(model.parameters(), cfg.grad_clip)
            opt.step()
            if cfg.bias_update_speed:
                for moe in model.moe_layers():
                    update_bias(moe.gate, moe.load, cfg.bias_update_speed)
            step += 1
            n_in = int((batch.segments >= 0).sum())
            tokens_seen += n_in
            logger.log({"step": step, "loss": parts["loss"].item(), "mtp_loss": parts["mtp_loss"].item(),
                        "lr": lr, "grad_norm": grad_norm, "tokens": n_in, "trained_tokens": batch.trained_tokens,
                        "tokens_seen": tokens_seen, "step_s": time.time() - t0})
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss'].item():.3f}")
            if step % cfg.save_every == 0 or stop.requested or step in (cfg.steps, cfg.stop_after):
                save(step)
            if stop.requested or step == cfg.stop_after:
                print(f"[sft] stopped at step {step}; continue with --resume")
                break
    bar.close()
    logger.close()
    final = out / "final"
    if step >= cfg.steps:
        from ..checkpoint import save as save_model
        save_model(model, final, tokenizer=tokenizer)
        print(f"[sft] wrote {final}")
    return final


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(p):
    p.add_argument("--model", help="model folder to fine-tune (with tokenizer.json)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="jsonl file, one {\"messages\": [...]} per line")
    src.add_argument("--task", help="train on a task's generated worked solutions")
    p.add_argument("--out", help="run folder (metrics.jsonl, ckpt/, final/)")
    p.add_argument("--config", help="TOML file with any of the options below (command line wins)")
    p.add_argument("--difficulty", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int, help="packed rows per step")
    p.add_argument("--seq-len", type=int, help="tokens per packed row")
    p.add_argument("--warmup", type=int)
    p.add_argument("--mtp-lambda", type=float)
    p.add_argument("--save-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest checkpoint")


def main(args) -> int:
    cfg = make_config(SFTConfig, args, required=("model", "out"))
    sft(cfg)
    return 0
