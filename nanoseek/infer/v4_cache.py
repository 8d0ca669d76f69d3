"""DeepSeek-V4's decode cache (the cache protocol of model/v4.py): one slot per sequence, of a fixed max length.

What a V4 layer needs of the tokens before the new ones (V4 report Section 2.3):
* every layer: the raw K = V of the last sliding_window - 1 tokens (a query's window is those and itself), kept in
  a ring of K = sliding_window rows (row = position % K): one row more than the window needs, so that a decode
  step's write replaces only a key its query no longer sees, and a step can run again on the same cache (the
  engine reruns a compiled step that failed half-way eager; the compressors' rings and entries are rewritten
  with the same values);
* CSA and HCA layers: every compressed entry so far (max_len // rate rows, in order), and the compressor's pending
  tokens: the kv / gate projections (C, Z of eq. 20-21) of the window not complete yet, plus, with CSA's overlap,
  those of the window before it, whose first series (Ca) the next entry pools; a ring of (1 + overlap) * rate rows;
* CSA layers: the same for the lightning indexer, at index_head_dim (its keys are compressed entries too).
A step gathers these, the model computes with this step's tokens in front of them exactly what the full forward
computes, and the cache keeps what the next step needs (the last rows of the window, the new pending tokens, the
entries completed). A decoding CSA layer reads only the index_topk entries its indexer picks (selected()); the
indexer itself reads all of its keys, which it ranks.

Why slots and not pages (infer/cache.py): an entry spans rate tokens across page boundaries, the pending state and
the window ring belong to one sequence at one length, so a page of tokens is not a unit that sequences could share.
A slot is the engine's block: the BlockPool hands out slot ids 1..num_slots (0 is the scratch slot, never handed out)
and a block covers max_len tokens, so a sequence holds one slot for its whole life. Prefix reuse is off for V4 (it
would need the window and the pending state as they were at the end of the shared prefix); n > 1 copies of a
prompt each compute it. MTP speculation is off too: a rejected draft would have to be rolled back out of the ring.

Nothing is cleared between sequences: a step reads only rows its own sequence wrote (window positions before its
start, its pending tokens, its first entries), so a slot's old contents are never seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..model.v4 import CSA, SLIDING
from .cache import BlockPool


@dataclass
class Branch:
    """One compressor's state in a layer: the CSA/HCA compressor's ("compressor") or the indexer's ("indexer")."""
    rate: int
    overlap: bool
    kv: torch.Tensor         # (slots, keep, c*dim): projections C of the pending tokens, row = position % keep
    gate: torch.Tensor       # (slots, keep, c*dim): their gate logits Z (the position bias is added when pooling)
    entries: torch.Tensor    # (slots, max_len // rate, dim): the compressed entries, in order


def branch_specs(cfg: ModelConfig, kind: str) -> list[tuple[str, int, bool, int]]:
    """The compressors of a layer of this kind: (name, rate, overlap, dim) each (what model/v4.py builds)."""
    if kind == SLIDING:
        return []
    rate = cfg.compress_rates[kind]
    specs = [("compressor", rate, kind == CSA, cfg.head_dim)]
    return specs + ([("indexer", rate, True, cfg.index_head_dim)] if kind == CSA else [])


def ring_rows(cfg: ModelConfig) -> int:
    """Rows of the window ring: the keys before a query that its window holds, and one (see the module
    docstring)."""
    return max(cfg.sliding_window, 1)


def slot_shapes(cfg: ModelConfig, max_len: int) -> list[tuple[int, ...]]:
    """Per slot, the shape of every tensor the cache keeps (all layers)."""
    shapes = []
    for kind in cfg.layer_types:
        shapes.append((ring_rows(cfg), cfg.head_dim))
        for _, rate, overlap, dim in branch_specs(cfg, kind):
            c = 2 if overlap else 1
            shapes += [((1 + overlap) * rate, c * dim)] * 2 + [(max_len // rate, dim)]
    return shapes


class V4Cache:
    """The engine's cache for deepseek_v4 (one slot per sequence; see the module docstring). Per forward the engine
    calls plan(tables, starts, lens) once (tables[b] = [slot of row b]); the layers then call window / pending /
    entries, or store / selected (model/v4.py's cache protocol)."""

    paged = False              # the engine: one block (slot) per sequence, no prefix reuse (compiled step: CompiledV4)

    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        self.max_len, self.device = max_len, device
        self.pool = BlockPool(num_slots + 1, max_len)               # + the scratch slot 0

        def zeros(*shape):
            return torch.zeros(num_slots + 1, *shape, dtype=dtype, device=device)

        self.window_kv = [zeros(ring_rows(cfg), cfg.head_dim) for _ in cfg.layer_types]        # (slots, K, d)
        self.branches: list[dict[str, Branch]] = []
        for kind in cfg.layer_types:
            layer = {}
            for name, rate, overlap, dim in branch_specs(cfg, kind):
                c, keep = 2 if overlap else 1, (1 + overlap) * rate
                layer[name] = Branch(rate, overlap, zeros(keep, c * dim), zeros(keep, c * dim),
                                     zeros(max_len // rate, dim))
            self.branches.append(layer)
        size = torch.empty((), dtype=dtype).element_size()
        # in the long run a token costs its share of the compressed entries (config.py cache_entries); the window
        # and the pending tokens are a fixed cost per sequence (bytes_per_slot counts everything a slot holds)
        self.bytes_per_token = size * cfg.num_hidden_layers * cfg.kv_cache_elems_per_token
        self.bytes_per_slot = size * sum(math.prod(s) for s in slot_shapes(cfg, max_len))

    @staticmethod
    def slot_bytes(cfg: ModelConfig, max_len: int, dtype: torch.dtype) -> int:
        """Bytes one slot (one sequence of up to max_len tokens) holds, before building a cache."""
        return torch.empty((), dtype=dtype).element_size() * sum(math.prod(s) for s in slot_shapes(cfg, max_len))

    def plan(self, tables: list[list[int]], starts: list[int], lens: list[int]) -> torch.Tensor:
        """Fix this forward for every layer and return the new tokens' positions (B, T).

        Row b runs lens[b] new tokens at positions starts[b], starts[b] + 1, ... in the slot tables[b][0], after
        starts[b] tokens that earlier forwards of that slot ran. Rows are right-padded to T = max(lens); padding
        tokens are never written and no real query sees them (they come after it)."""
        if any(len(t) != 1 for t in tables) or any(s + n > self.max_len for s, n in zip(starts, lens)):
            raise ValueError(f"V4Cache.plan: each row needs one slot and at most max_len={self.max_len} tokens; "
                             f"got tables {tables}, starts {starts}, lens {lens}")
        dev = self.device
        self.slots = torch.tensor([t[0] for t in tables], device=dev)                      # (B,)
        self.start = torch.tensor(starts, device=dev)[:, None]                              # (B, 1)
        self.end = self.start + torch.tensor(lens, device=dev)[:, None]                     # (B, 1)
        self._spans = list(zip(starts, lens))
        t = torch.arange(max(lens), device=dev)
        self.positions = self.start + t                                                     # (B, T)
        self.valid = t < self.end - self.start                                              # (B, T) not padding
        self._shared = {}
        return self.positions

    def _step(self, key: tuple, make):
        """What every layer of this step computes alike (the window's mask, which rows a ring keeps): made by the
        first layer that asks, then reused; a decode step is small enough that these calls would cost as much as
        the layers' own arithmetic."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def _where(self, rows: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The writes of (rows, keep) (B, T) as index tensors for _write: (slot, row) of the store, (b, t) of x."""
        b, t = keep.nonzero(as_tuple=True)
        return self.slots[b], rows[b, t], b, t

    @staticmethod
    def _write(store: torch.Tensor, where: tuple[torch.Tensor, ...], x: torch.Tensor) -> None:
        """store[slot, row] = x[b, t] for each write of where (_where); x (B, T, ...)."""
        slot, row, b, t = where
        store[slot, row] = x[b, t]

    def window(self, layer: int, kv: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's keys kv (B, T, d) -> the keys to attend to, the ring's then these (B, K + T, d), and which
        each query sees (B, T, K + T): key s of query t if t - size < s <= t. Keeps each row's last K keys."""
        ring = self.window_kv[layer]
        allowed, where = self._step(("window", ring.shape[1], size), lambda: self._window_plan(ring.shape[1], size))
        keys = torch.cat([ring[self.slots], kv], dim=1)                 # (B, K + T, d)
        self._write(ring, where, kv)
        return keys, allowed

    def _window_plan(self, K: int, size: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """window()'s mask (B, T, K + T) for a ring of K rows and the ring's writes (each row's last K keys)."""
        r = torch.arange(K, device=self.positions.device)
        ring_pos = self.start - 1 - (self.start - 1 - r) % K            # (B, K): latest position < start in row r
        key_pos = torch.cat([ring_pos, self.positions], dim=1)          # (B, K + T)
        exists = torch.cat([ring_pos >= 0, self.valid], dim=1)
        d = self.positions[:, :, None] - key_pos[:, None, :]            # (B, T, K + T)
        allowed = (d >= 0) & (d < size) & exists[:, None, :]
        return allowed, self._where(self.positions % K, self.valid & (self.positions >= self.end - K))

    def pending(self, layer: int, name: str, kv: torch.Tensor, gate: torch.Tensor, rate: int, overlap: bool):
        """This step's projections kv, gate (B, T, c*dim) -> the projections of whole windows (B, L, c*dim), the
        pending tokens in front of these (absent ones, before position 0 or past a row's end, gated -inf), and
        first (B, 1): the entry the first of those windows completes (with overlap the window before it leads).
        The windows are those this step completes in some row; a window no row completes would make an entry that
        store() drops. None when no row completes one (most decode steps): the new tokens are only kept."""
        br = self.branches[layer][name]
        K, T, lead = br.kv.shape[1], kv.shape[1], int(overlap)
        idx, present, where = self._step(("pending", rate, lead, K, T), lambda: self._pending_plan(rate, lead, K, T))
        windows = None
        if idx is not None:

            def gather(ring: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
                src = torch.cat([ring[self.slots], new], dim=1)         # (B, K + T, c*dim)
                return src.gather(1, idx[..., None].expand(-1, -1, src.shape[-1]))

            gated = gather(br.gate, gate).masked_fill(~present[..., None], float("-inf"))
            windows = gather(br.kv, kv), gated, self.start // rate
        self._write(br.kv, where, kv)
        self._write(br.gate, where, gate)
        return windows

    def _pending_plan(self, rate: int, lead: int, K: int, T: int):
        """pending()'s gather: for each row the L = rate * (windows completed + lead) tokens to pool, their index
        idx (B, L) into [the ring's K rows; the T new tokens] and which are present (B, L), both None when no row
        completes a window; and the ring's writes (_where): the tokens of the incomplete window (and, overlapping,
        of the one before) stay pending."""
        done = max((s + n) // rate - s // rate for s, n in self._spans)    # windows completed, the most of any row
        idx = present = None
        if done:
            p = (self.start // rate - lead) * rate + torch.arange(rate * (done + lead), device=self.start.device)
            idx = torch.where(p < self.start, p % K, K + p - self.start).clamp(max=K + T - 1)     # (B, L)
            present = (p >= 0) & (p < self.end)
        keep = self.valid & (self.positions >= (self.end // rate - lead) * rate)
        return idx, present, self._where(self.positions % K, keep)

    def store(self, layer: int, name: str, new: torch.Tensor, first: torch.Tensor) -> None:
        """Pooled entries first, first + 1, ... (B, W, dim) of pending()'s windows: keep the complete ones."""
        br = self.branches[layer][name]
        w = first + torch.arange(new.shape[1], device=new.device)       # (B, W)
        self._write(br.entries, self._where(w, (w + 1) * br.rate <= self.end), new)

    def entries(self, layer: int, name: str, new: torch.Tensor | None, first: torch.Tensor | None) -> torch.Tensor:
        """store() (new: None when pending() found nothing to pool), then every entry of each row so far
        (B, E, dim), E = the most complete of any row (the rest masked by the attention: an entry w is visible once
        (w + 1) * rate tokens are in)."""
        if new is not None:
            self.store(layer, name, new, first)
        br = self.branches[layer][name]
        E = max((s + n) // br.rate for s, n in self._spans)
        return br.entries[self.slots, :E]

    def selected(self, layer: int, name: str, positions: torch.Tensor) -> torch.Tensor:
        """The entries at positions (B, T, k) of each row (CSA's top-k per query) -> (B, T, k, dim): reads T x k
        entries, not all of them. Positions a query may not see read an entry that the attention masks."""
        return self.branches[layer][name].entries[self.slots[:, None, None], positions]
