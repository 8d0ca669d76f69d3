"""SFT data: chat conversations -> assistant-only training examples -> packed rows (what data/corpus.py is to
pretraining).

    examples = render(tok, messages)                     # [(token ids, trained mask)], mask True on assistant tokens
    batch = pack([[ex1, ex2], [ex3]], seq_len)           # Batch of (rows, seq_len): ids, targets, positions, documents
    stream = ExampleStream(tok, seed, rows, seq_len, convs=read_conversations("chats.jsonl"))   # or task=...
    stream.batch(step)                                   # the packed batch of a step, a pure function of (seed, step)

Each conversation is rendered with tok.apply_chat_template and cut into the text before each assistant turn (system,
user and template tokens: masked) and the assistant's own tokens (reasoning, answer and the closing EOS: trained).
Several examples share a row; `documents` (the example index of each token) and positions that restart at each
example let the model keep them apart (model.losses(..., positions=, documents=)).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError

IGNORE = -100


# ---------------------------------------------------------------------------------------------------- rendering
def render(tok, messages: list[dict]) -> list[tuple[list[int], list[bool]]]:
    """A conversation -> [(token ids, trained mask)]: one example, or one per assistant turn when the template
    renders earlier turns differently from the last one (R1-style templates drop the reasoning of past turns).

    The trained mask is True exactly on the assistant's tokens (reasoning, answer, EOS); everything the template
    adds around them and every system/user token is False.
    """
    spans = []   # per assistant turn: (its prompt, the assistant's text, the conversation rendered with the turn)
    for i in (i for i, m in enumerate(messages) if m.get("role") == "assistant"):
        prefix = tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False, tokenize=False)
        spans.append((prefix, assistant_text(prefix, full, messages[i]), full))
    if any(prefix + text != full for prefix, text, full in spans) or \
            not all(prefix.startswith(before) for (prefix, _, _), (_, _, before) in zip(spans[1:], spans)):
        return [_encode(tok, [(prefix, False), (text, True)]) for prefix, text, _ in spans]
    pieces, done = [], ""
    for prefix, text, full in spans:
        pieces += [(prefix[len(done):], False), (text, True)]
        done = full
    return [_encode(tok, pieces)] if spans else []


def assistant_text(prefix: str, full: str, message: dict) -> str:
    """What the model writes after the generation prompt `prefix` for this assistant turn.

    Most templates render a finished turn as its generation prompt followed by that text. Templates in the style
    of DeepSeek-R1-Distill's open `<think>` in the generation prompt but render a finished turn from its answer
    alone (the reasoning dropped); the model's text is then rebuilt as it writes it: the reasoning, `</think>`,
    and the answer with the template's end of turn."""
    if full.startswith(prefix):
        return full[len(prefix):]
    k = prefix.rfind("<think>")
    if k < 0 or not full.startswith(prefix[:k]) or prefix[k:].strip() != "<think>":
        raise UsageError("the chat template renders an assistant turn in a way that does not extend its "
                         "generation prompt; cannot tell the assistant's tokens apart")
    reasoning = (message.get("reasoning_content") or "").strip("\n")
    return f"{reasoning}\n</think>\n\n" + full[k:]


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
    from .jsonl import iter_jsonl

    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file (expected a jsonl file of {{\"messages\": [...]}} lines)")
    convs, bad = [], []
    for n, d in iter_jsonl(path, bad_lines=bad):
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
        from .split import draw_problems, train_rng

        rng, examples = train_rng(self.seed, "sft", step), []
        while True:   # until an example starts a row past the last one: the rows before it are full
            p = draw_problems(self.task, rng, self.difficulty, 1, split="train")[0]
            examples += render(self.tok, task_messages(self.task, p))
            plan = plan_rows([len(ex[0]) for ex in examples], self.seq_len)
            if len(plan) > self.rows:
                return [[examples[i] for i in row] for row in plan[:self.rows]]
