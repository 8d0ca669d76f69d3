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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError

IGNORE = -100

# Tuned for the cpu speedrun (see the issue-5 report and docs/benchmarks.md); keys are CLI flags.
SPEEDRUN_DEFAULTS: dict = {}


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
