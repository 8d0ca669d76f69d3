"""`nanoseek sft`: supervised fine-tuning on chat conversations (DeepSeek-R1's cold start; distillation's student).

    nanoseek sft --model runs/pretrain/final --task linear --out runs/sft
    nanoseek sft --model DIR --data chats.jsonl --out runs/sft [--resume]
    torchrun --standalone --nproc_per_node=2 -m nanoseek.cli sft ... [--fsdp]

Data: a jsonl file of {"messages": [{"role", "content"[, "reasoning_content"]}, ...]} (reasoning_content on an
assistant turn is rendered inside <think>...</think> by the tokenizer's chat template), or --task NAME, whose
generator writes problems with worked, step-by-step solutions.

Loss on assistant tokens only: each conversation is rendered with tok.apply_chat_template and cut into the text
before each assistant turn (system, user and template tokens: masked) and the assistant's own tokens (reasoning,
answer and the closing EOS: trained). Examples are packed several per row and trained on the model's full attention
path, `model.losses(..., positions=, documents=)`: a block-diagonal causal mask and positions that restart at each
example keep them from seeing one another, exactly as if each ran alone. The loss is the mean over the trained
tokens of the whole global batch, whatever the number of processes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import UsageError
from . import optim, runtime
from .run import Run
from .runtime import TrainModule

IGNORE = -100


# ---------------------------------------------------------------------------------------------------- rendering
def render(tok, messages: list[dict]) -> list[tuple[list[int], list[bool]]]:
    """A conversation -> [(token ids, trained mask)]: one example, or one per assistant turn when the template
    renders earlier turns differently from the last one (R1-style templates drop the reasoning of past turns).

    The trained mask is True exactly on the assistant's tokens (reasoning, answer, EOS); everything the template
    adds around them and every system/user token is False.
    """
    spans = []   # per assistant turn: (the conversation rendered up to its generation prompt, and with the turn)
    for i in (i for i, m in enumerate(messages) if m.get("role") == "assistant"):
        prefix = tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False, tokenize=False)
        if not full.startswith(prefix):
            raise UsageError("the chat template renders an assistant turn in a way that does not extend its "
                             "generation prompt; cannot tell the assistant's tokens apart")
        spans.append((prefix, full))
    if not all(prefix.startswith(before) for (prefix, _), (_, before) in zip(spans[1:], spans)):
        return [_encode(tok, [(prefix, False), (full[len(prefix):], True)]) for prefix, full in spans]
    pieces, done = [], ""
    for prefix, full in spans:
        pieces += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    return [_encode(tok, pieces)] if spans else []


def _encode(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in pieces:
        t = tok.encode(text) if text else []
        ids, mask = ids + t, mask + [trained] * len(t)
    return ids, mask


def task_messages(task, problem) -> list[dict]:
    """The chat prompt of a problem followed by its worked solution as the assistant's answer.

    task.worked_solution(problem) is "<think>reasoning</think>answer"; split into reasoning_content and content
    so the template renders it the way the model will produce it at inference time.
    """
    sol = task.worked_solution(problem)
    msg = {"role": "assistant", "content": sol}
    if "<think>" in sol and "</think>" in sol:
        reasoning, content = sol.split("<think>", 1)[1].split("</think>", 1)
        msg.update(reasoning_content=reasoning.strip("\n"), content=content.strip("\n"))
    return task.messages(problem) + [msg]


def read_conversations(path: str | Path) -> list[list[dict]]:
    """{"messages": [...]} per line -> conversations; UsageError listing every malformed line number."""
    from ..data.jsonl import iter_jsonl

    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file (expected a jsonl file of {{\"messages\": [...]}} lines)")
    convs, bad = [], []
    for n, d in iter_jsonl(path):
        msgs = d.get("messages") if isinstance(d, dict) else None
        if (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content", ""), str) and isinstance(m.get("reasoning_content", ""), str)
                for m in msgs) and any(m["role"] == "assistant" for m in msgs)):
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
    documents: torch.Tensor   # (B, T), example index within the row, -1 for padding

    def __getitem__(self, rows: slice) -> Batch:
        return Batch(*(t[rows] for t in vars(self).values()))

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in vars(self).values()))

    @property
    def trained_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def mtp_labels(self) -> int:
        """Labels of the first MTP depth (model.losses: targets one place on, inside the same example)."""
        same = self.documents[:, 1:] == self.documents[:, :-1]
        return int(((self.targets[:, 1:] != IGNORE) & same).sum())


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
    doc = torch.full((B, seq_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for s, (x, m) in enumerate(row):
            x, m = x[:seq_len - col], m[:seq_len - col]
            L = len(x)
            ids[r, col:col + L] = torch.tensor(x, dtype=torch.long)
            # target of position j is token j+1, trained when token j+1 is an assistant token
            tgt[r, col:col + L - 1] = torch.tensor([t if keep else IGNORE for t, keep in zip(x[1:], m[1:])],
                                                   dtype=torch.long)
            pos[r, col:col + L] = torch.arange(L)
            doc[r, col:col + L] = s
            col += L
    return Batch(ids, tgt, pos, doc)


class ExampleStream:
    """The packed global batch of optimizer step `step`, a pure function of (seed, step): resuming needs no data
    state, and every process packs the same rows (each then takes its share).

    File data: each epoch is a fresh seeded shuffle of the rendered conversations, packed into rows in that order;
    step s takes rows [s * rows, (s + 1) * rows) of the epochs laid end to end. Task data: each step draws new
    training-split problems from its own seed until its rows are full.
    """

    def __init__(self, tok, seed: int, rows: int, seq_len: int, convs=None, task=None, difficulty: int = 1):
        self.tok, self.seed, self.rows, self.seq_len = tok, seed, rows, seq_len
        self.task, self.difficulty, self.pad_id = task, difficulty, tok.pad_id or 0
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
        return pack(self._file_rows(step) if self.examples is not None else self._task_rows(step), self.seq_len,
                    self.pad_id)

    def _file_rows(self, step: int) -> list:
        rows, r, epoch = [], step * self.rows, 0      # row r of the epochs laid end to end
        while len(rows) < self.rows:
            er = self._epoch_rows(epoch)
            if r >= len(er):
                r, epoch = r - len(er), epoch + 1
                continue
            rows.append([self.examples[i] for i in er[r]])
            r += 1
        return rows

    def _task_rows(self, step: int) -> list:
        from ..data.split import draw_problems, train_rng

        rng, examples = train_rng(self.seed, "sft", step), []
        while True:   # until an example starts a row past the last one: the rows before it are full
            p = draw_problems(self.task, rng, self.difficulty, 1, split="train")[0]
            examples += render(self.tok, task_messages(self.task, p))
            plan = plan_rows([len(ex[0]) for ex in examples], self.seq_len)
            if len(plan) > self.rows:
                return [[examples[i] for i in row] for row in plan[:self.rows]]


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class SFTConfig:
    model: str = ""                 # model folder to fine-tune (with tokenizer.json)
    out: str = ""                   # run folder (metrics.jsonl, config.toml, ckpt/, final/)
    data: str | None = None         # jsonl file, one {"messages": [...]} per line
    task: str | None = None         # or: a task's worked solutions, generated fresh every step
    difficulty: int | None = None   # task difficulty (None: the task's default)
    steps: int = 300                # optimizer steps
    batch_size: int = 16            # packed rows per optimizer step (over all processes)
    seq_len: int = 512              # tokens per packed row
    lr: float = 1e-3                # peak learning rate
    min_lr_ratio: float = 0.1       # final lr = lr * min_lr_ratio
    warmup: int = 20                # warmup steps
    schedule: str = "cosine"        # cosine | wsd
    weight_decay: float = 0.0       # AdamW decay of matrices
    grad_clip: float = 1.0          # 0: no clipping (the norm is still logged)
    mtp_lambda: float = 0.3         # weight of the MTP loss (V3 uses 0.3 early in training), when the model has MTP
    bias_update_speed: float = 0.0  # V3's routing-bias gamma; 0 keeps the pretrained routing as it is
    seed: int = 0                   # data order (file) or problem stream (task)
    save_every: int = 100           # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2       # newest checkpoints kept (0: all)
    resume: bool = False            # continue from the newest complete OUT/ckpt/step-N
    stop_after: int = 0             # stop (with a checkpoint) after this step, as if interrupted
    fsdp: bool = False              # FSDP2 fully_shard instead of DDP (under torchrun)
    device: str | None = None       # cpu | cuda; None: the GPU when there is one
    progress: bool = True           # tqdm bar
    REQUIRED: ClassVar[tuple] = ("model", "out")
    ALIASES: ClassVar[dict] = {"bias_gamma": "bias_update_speed"}


CONFIG = SFTConfig


# ---------------------------------------------------------------------------------------------------- training
def sft(cfg: SFTConfig, model=None, tokenizer=None, record=None) -> Path:
    """Fine-tune and return OUT/final (a model folder with the tokenizer). `model`/`tokenizer` given: train them
    in place (distillation's fresh student), else load cfg.model. record: the config written to OUT/config.toml
    (default cfg)."""
    from ..checkpoint import load_model_and_tokenizer
    from ..data.tasks import get_task

    if (cfg.data is None) == (cfg.task is None):
        raise UsageError("pass exactly one of --data FILE.jsonl or --task NAME")
    rt = runtime.init(cfg.device)
    try:
        run = Run(cfg, "sft", rt, record)
        mine = rt.share(cfg.batch_size, "--batch-size")       # this process's rows of each global batch
        task = get_task(cfg.task) if cfg.task else None
        convs = read_conversations(cfg.data) if cfg.data else None
        if model is None:
            model, tokenizer = load_model_and_tokenizer(cfg.model, purpose="sft")
        difficulty = cfg.difficulty if cfg.difficulty is not None else getattr(task, "default_difficulty", 1)
        stream = ExampleStream(tokenizer, cfg.seed, cfg.batch_size, cfg.seq_len, convs, task, difficulty)
        runtime.seed(cfg.seed)
        model = model.float().to(rt.device).train()    # float32 weights and optimizer; bf16 autocast on GPU
        run.restore_weights(model)
        module = runtime.parallelize(TrainModule(model), rt, cfg.fsdp, blocks=[*model.layers, *model.mtp])
        opt = optim.adamw(module, cfg.lr, cfg.weight_decay)
        optim.add_bias_update(opt, optim.ExpertLoads(model, rt), cfg.bias_update_speed)
        run.start(module, model, opt, tokenizer)
        mtp_lambda = cfg.mtp_lambda if len(model.mtp) else 0.0
        W = rt.world_size
        for step in run.steps():
            lr = optim.set_lr(opt, optim.lr_at(step, total=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                                               schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio))
            batch = stream.batch(step)[mine].to(rt.device)
            with runtime.autocast(rt.device):
                out = module(batch.input_ids, batch.targets, positions=batch.positions, documents=batch.documents)
            # means over the GLOBAL batch's labels: each process weighs its own means by its share of the labels
            # (times W, as DDP / FSDP average the gradients over processes)
            n, n_mtp = batch.trained_tokens, batch.mtp_labels
            N, N_mtp, tokens = rt.sum(n, n_mtp, int((batch.documents >= 0).sum()))
            w, w_mtp = n * W / max(N, 1), n_mtp * W / max(N_mtp, 1)
            (out["loss"] * w + mtp_lambda * out["mtp_loss"] * w_mtp + out["balance_loss"]).backward()
            grad_norm = optim.clip_grad(module.parameters(), cfg.grad_clip)
            opt.step()     # (the bias-update hook runs here)
            opt.zero_grad(set_to_none=True)
            # (a process whose rows hold no trained token has a NaN mean, weighed 0: its gradient is 0, not NaN)
            loss, mtp_loss = rt.sum(out["loss"].item() * w / W if n else 0.0, out["mtp_loss"].item() * w_mtp / W)
            run.log({"loss": loss, "mtp_loss": mtp_loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens),
                     "trained_tokens": int(N)}, tokens=int(tokens), loss=loss)
        return run.finish(summary=("loss", "mtp_loss"))
    finally:
        runtime.shutdown(rt)


def main(cfg: SFTConfig) -> int:
    sft(cfg)
    return 0
