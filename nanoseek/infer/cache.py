"""The engine's paged caches: one interface (blocks, block tables, prefix reuse, per-step plan) for every attention.

What a token leaves in the cache depends on the attention (chosen by `cfg.attention`), nothing else does:
* "mla" (DeepSeek-V2 Section 2.1.2): per layer, the normalised latent c_kv (kv_lora_rank) and the roped shared key
  k_pe (qk_rope_head_dim): 576 elements per token per layer for V3, where a per-head K/V cache holds 40,960.
* "gqa" (the dense students: qwen2, llama, qwen3): per layer, K (after RoPE, and qwen3's k-norm) and V of each of
  the n_kv_heads key/value heads: 2 x n_kv_heads x head_dim elements (1,024 for Qwen2.5-7B / Llama-3-8B).
* "mla" with DeepSeek Sparse Attention (V3.2, cfg.dsa): the latent plus the lightning indexer's one key per token
  (index_head_dim, 128): 704 elements per token per layer. Decoding reads every indexer key but only the
  index_topk selected latents (update_indexer, then update_selected). DeepSeek stores the indexer key in FP8; here
  it has the cache's dtype.

Layout (the PagedAttention idea of vLLM, Kwon et al. 2023): each layer owns, for each of its two cached tensors,
one pool of `num_blocks` blocks of `block_size` token slots, e.g. c_kv (num_blocks, block_size, kv_lora_rank) or
K (num_blocks, block_size, n_kv_heads, head_dim). A sequence holds a list of block ids (its block table);
slot = block * block_size + offset. Block 0 is a scratch block that is never handed out: padding tokens write
there and padded reads point there (always masked).

Prefix cache: a full block is named by a hash chain, key_k = (hash(key_{k-1}), the block's tokens), so a block
is only reused when every token before it matches too. Blocks carry reference counts; a cached block nobody
references stays in the pool (LRU order) until the allocator needs it back.

Per forward the engine calls `plan(tables, starts, lens)` once: the slots each new token writes, the slots each
sequence reads (its blocks gathered into a padded (B, S) view) and the attention mask, for all layers; each layer's
`update(layer, a, b)` (the cache protocol of MLA.forward and GQA.forward) then does one scatter and one gather per
cached tensor.

LatentCache and KVCache (at the end) are contiguous, unpaged caches of the same protocols, for tests and simple
generation. DeepSeek-V4's cache is not paged (its compressed entries span tokens, its window and compressors carry
per-sequence state): infer/v4_cache.py, one slot per sequence, behind the same plan() and pool.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

import torch

from ..config import ModelConfig


class BlockPool:
    """Block ids, reference counts and the prefix-hash table. Pure bookkeeping: no tensors."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: need at least 2 (block 0 is the scratch block)")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(1, num_blocks))
        self.ref = [0] * num_blocks
        self.key: list[tuple | None] = [None] * num_blocks      # prefix key of a registered (full) block
        self.cached: dict[tuple, int] = {}                       # prefix key -> block id
        self.evictable: OrderedDict[int, None] = OrderedDict()  # registered blocks with ref 0, oldest first

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    def num_free(self) -> int:
        """Blocks that allocate() can hand out now: never used or cached-but-unreferenced."""
        return len(self.free) + len(self.evictable)

    def num_used(self) -> int:
        return self.capacity - self.num_free()

    def allocate(self) -> int:
        if self.free:
            b = self.free.popleft()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)   # least recently used cached block
            del self.cached[self.key[b]]
            self.key[b] = None
        else:
            raise RuntimeError("the paged cache is out of blocks (the engine reserves blocks before admitting requests; "
                               "this is a bug)")
        self.ref[b] = 1
        return b

    def release(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.key[b] is not None:
                self.evictable[b] = None                 # most recently used end
            else:
                self.free.append(b)

    def lookup(self, key: tuple) -> int | None:
        """The cached block holding exactly this prefix key, now referenced once more; None on a miss."""
        b = self.cached.get(key)
        if b is not None:
            if self.ref[b] == 0:
                del self.evictable[b]
            self.ref[b] += 1
        return b

    def register(self, b: int, key: tuple) -> None:
        """Block b is full and holds the prefix `key`: make it findable (the first writer of a key wins)."""
        if key not in self.cached and self.key[b] is None:
            self.cached[key] = b
            self.key[b] = key

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (after the weights change); blocks in use stay allocated."""
        for b in self.evictable:
            self.free.append(b)
        self.evictable.clear()
        for b in self.cached.values():
            self.key[b] = None
        self.cached.clear()


def block_keys(tokens: list[int], block_size: int, n_blocks: int, lookahead: int = 0) -> list[tuple]:
    """Prefix keys of the first n_blocks full blocks of `tokens`.

    key_k = (hash(key_{k-1}), tokens of block k [+ `lookahead` following tokens]). The lookahead is 1 with MTP: the
    MTP layer's latent at position i depends on token i+1 (V3 eq. 21), so a block's MTP latents are only valid for
    the same next token.
    """
    keys, parent = [], 0
    for k in range(n_blocks):
        key = (parent, tuple(tokens[k * block_size:(k + 1) * block_size + lookahead]))
        keys.append(key)
        parent = hash(key)
    return keys


class PagedCache:
    """The engine's cache: a BlockPool shared by every layer, per-layer pools of the tensors a token leaves
    (what they are is the subclass's `token_shapes`), and the per-step view the attention reads through.

    Subclasses name the tensors (`names`, two: what `update` stores; DSA's cache adds the indexer key) and give
    their per-token shapes; the pools are then also attributes under those names (PagedLatentCache: `c_kv`, `k_pe`;
    PagedKVCache: `k`, `v`; PagedDSACache: `c_kv`, `k_pe`, `k_index`), one tensor per layer each.
    """

    names: tuple[str, ...]
    paged = True             # blocks of block_size tokens: the engine reuses prefixes (V4Cache: False)

    @staticmethod
    def token_shapes(cfg: ModelConfig) -> tuple[tuple[int, ...], ...]:
        raise NotImplementedError

    @classmethod
    def elems_per_token(cls, cfg: ModelConfig) -> int:
        """Elements one token costs per layer (all its tensors)."""
        return sum(math.prod(s) for s in cls.token_shapes(cfg))

    def __init__(self, cfg: ModelConfig, num_layers: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.block_size, self.device = block_size, device
        self.pool = BlockPool(num_blocks, block_size)
        for name, shape in zip(self.names, self.token_shapes(cfg)):     # (num_blocks, block_size, *shape) per layer
            setattr(self, name, [torch.zeros(num_blocks, block_size, *shape, dtype=dtype, device=device)
                                 for _ in range(num_layers)])
        # per layer, slot-major views (num_blocks * block_size, elems) that update() scatters into and gathers from
        self._flat = [tuple(getattr(self, name)[i].view(num_blocks * block_size, -1) for name in self.names)
                      for i in range(num_layers)]
        self.bytes_per_token = num_layers * self.elems_per_token(cfg) * torch.empty((), dtype=dtype).element_size()
        self._write = self._read = self._mask = None

    def plan(self, tables: list[list[int]], starts: list[int], lens: list[int]) -> torch.Tensor:
        """Fix the indices of one forward, for every layer, and return the new tokens' positions (B, T).

        Row b runs lens[b] new tokens at positions starts[b], starts[b] + 1, ... (a prefill chunk, a decode token,
        a token and its MTP draft); tables[b] is its block table, covering starts[b] + lens[b] tokens. Rows are
        right-padded to T = max(lens); padding writes to the scratch slot 0 and attends to its row's real keys
        only (never an all-masked softmax row)."""
        bs, dev = self.block_size, self.device
        T = max(lens)
        totals = [s + n for s, n in zip(starts, lens)]
        S = max(totals)
        nb = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (nb - len(t)) for t in tables], device=dev)            # (B, nb)
        meta = torch.tensor([starts, lens, totals], device=dev)                                 # (3, B)
        start, n_valid, total = meta[0, :, None], meta[1, :, None], meta[2, :, None]
        j = torch.arange(S, device=dev)
        read = table[:, j // bs] * bs + j % bs                                                    # (B, S)
        read = read.masked_fill(j >= total, 0)                     # past the end: the scratch slot
        t = torch.arange(T, device=dev)
        qpos = start + t                                                                          # (B, T)
        valid = t < n_valid
        write = torch.where(valid, read.gather(1, qpos.clamp(max=S - 1)), 0)
        mask = None            # one new token per row and equal lengths: every key is visible (saves a fill/layer)
        if T > 1 or min(totals) < S:   # causal within the row; padded query rows see the row's real keys only
            mask = ((j <= qpos[..., None]) & (j < total[..., None]))[:, None]                   # (B, 1, T, S)
        self.set_step(write.view(-1), read, mask)
        return qpos

    def set_step(self, write_slots: torch.Tensor, read_slots: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Fix the indices of this forward for every layer (plan() computes them).

        write_slots (B*T,): slot of each new token (padding -> scratch slot 0); read_slots (B, S): the slots each
        sequence attends over, padded with 0; mask (B, 1, T, S) bool, True = may attend (None: all S visible).
        """
        self._write, self._read, self._mask = write_slots, read_slots, mask
        self._paged = None        # the block table and visible lengths of update_paged, derived on first use

    def update(self, layer: int, a: torch.Tensor, b: torch.Tensor):
        """Store this step's two tensors (B, T, *shape) and return every visible one (B, S, *shape) and the mask.

        MLA: (c_kv, k_pe); GQA: (k, v) with shape (n_kv_heads, head_dim)."""
        B, S = self._read.shape
        read = self._read.view(-1)
        return (*(self._store(layer, i, x).index_select(0, read).view(B, S, *x.shape[2:]) for i, x in enumerate((a, b))),
                self._mask)

    def _store(self, layer: int, i: int, x: torch.Tensor) -> torch.Tensor:
        """Write this step's tokens of tensor i (B, T, *shape) into their slots; returns its flat pool."""
        flat = self._flat[layer][i]
        flat.index_copy_(0, self._write, x.reshape(-1, flat.shape[1]))
        return flat


class PagedLatentCache(PagedCache):
    """MLA's paged cache: c_kv (kv_lora_rank) and k_pe (qk_rope_head_dim) per token and layer."""

    names = ("c_kv", "k_pe")

    @staticmethod
    def token_shapes(cfg: ModelConfig):
        return (cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)


    def update_paged(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Store this step's latents and return the cache as it lies, for a kernel that reads it through the block
        table (model/flash_mla.py) instead of update()'s gathered copy: this layer's pools c_kv (num_blocks,
        block_size, kv_lora_rank) and k_pe (num_blocks, block_size, rope), the block table (B, max_blocks) and each
        query's visible length kv_len (B, T): query t of row b sees positions 0 .. kv_len[b, t] - 1 of its row."""
        self._store(layer, 0, c_kv)
        self._store(layer, 1, k_pe)
        if self._paged is None:                # once per step, shared by every layer
            bs, (B, S) = self.block_size, self._read.shape
            table = self._read[:, ::bs] // bs  # plan() reads position k * bs of a row at slot table[k] * bs
            # plan()'s mask is a prefix of each query's row (causal, within the row's length): its count is the length
            kv_len = (self._mask[:, 0].sum(-1) if self._mask is not None
                      else torch.full((B, c_kv.shape[1]), S, device=self._read.device))
            self._paged = table.to(torch.int32), kv_len.to(torch.int32)
        return self.c_kv[layer], self.k_pe[layer], *self._paged


class PagedKVCache(PagedCache):
    """Grouped-query attention's paged cache: K and V, (n_kv_heads, head_dim) each, per token and layer."""

    names = ("k", "v")

    @staticmethod
    def token_shapes(cfg: ModelConfig):
        return (cfg.num_key_value_heads, cfg.head_dim), (cfg.num_key_value_heads, cfg.head_dim)


class PagedDSACache(PagedLatentCache):
    """DeepSeek Sparse Attention's paged cache (V3.2): the latent and the lightning indexer's key per token and
    layer, in the same blocks (so prefix reuse and chunked prefill cover both)."""

    names = ("c_kv", "k_pe", "k_index")

    @staticmethod
    def token_shapes(cfg: ModelConfig):
        return (cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,), (cfg.index_head_dim,)

    def update_indexer(self, layer: int, keys: torch.Tensor):
        """Store this step's indexer keys (B, T, index_head_dim); return every visible one (B, S, index_head_dim)
        and the mask of update()."""
        B, S = self._read.shape
        return self._store(layer, 2, keys).index_select(0, self._read.view(-1)).view(B, S, -1), self._mask

    def update_selected(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor):
        """Store this step's latents and return only those at `positions` (B, T, k) of each row's visible
        sequence: c_kv (B, T, k, kv_lora_rank), k_pe (B, T, k, rope). Reads T x k latents, not S."""
        B, T, k = positions.shape
        slots = self._read.gather(1, positions.reshape(B, T * k)).view(-1)               # (B*T*k,)
        return tuple(self._store(layer, i, x).index_select(0, slots).view(B, T, k, -1)
                     for i, x in enumerate((c_kv, k_pe)))


PAGED_CACHES: dict[str, type[PagedCache]] = {"mla": PagedLatentCache, "gqa": PagedKVCache}


def paged_cache_class(cfg: ModelConfig) -> type[PagedCache]:
    """The paged cache of this model's attention (cfg.attention: "mla" or "gqa"; MLA with an indexer: DSA's)."""
    if cfg.model_type == "deepseek_v4":
        raise ValueError("deepseek_v4's cache is not paged: infer/v4_cache.py V4Cache, one slot per sequence "
                         "(the engine builds it)")
    if cfg.attention not in PAGED_CACHES:
        raise ValueError(f"no paged cache for attention {cfg.attention!r}: the engine serves {sorted(PAGED_CACHES)}")
    return PagedDSACache if cfg.dsa else PAGED_CACHES[cfg.attention]


class _ContiguousCache:
    """A contiguous cache of two per-token tensors for B sequences that advance together (tests, simple generation):
    per layer, (B, max_len, *shape) each. Call `advance()` after each forward."""

    names: tuple[str, ...]

    def __init__(self, shapes, n_layers: int, batch: int, max_len: int, dtype, device):
        for name, shape in zip(self.names, shapes):
            setattr(self, name, torch.zeros(n_layers, batch, max_len, *shape, dtype=dtype, device=device))
        self.length = 0   # tokens already cached (the same for every layer once a forward finishes)
        self._new = 0

    def _store(self, layer, name, x):
        """Write x (B, T, *shape) after the cached tokens; returns the store's visible part (B, S, *shape)."""
        T, start = x.shape[1], self.length
        store = getattr(self, name)
        store[layer, :, start:start + T] = x
        self._new = T
        return store[layer, :, :start + T]

    def _mask(self, T, device):
        """(T, S) for T > 1: the new tokens see the cached ones and, causally, each other; None for one token."""
        return torch.ones(T, self.length + T, dtype=torch.bool, device=device).tril(self.length) if T > 1 else None

    def update(self, layer, a, b):
        return (self._store(layer, self.names[0], a), self._store(layer, self.names[1], b),
                self._mask(a.shape[1], a.device))

    def advance(self):
        """Call after each forward: the tokens just written become part of the context."""
        self.length += self._new
        self._new = 0


class LatentCache(_ContiguousCache):
    """A contiguous latent KV cache for B sequences that advance together (tests, simple generation).

    Holds, per layer, c_kv (B, max_len, kv_lora_rank) and k_pe (B, max_len, qk_rope_head_dim) and nothing else:
    that is all MLA needs. PagedLatentCache (above, the engine's) implements the same `update`. With DSA (cfg.dsa)
    it also holds the indexer keys k_index (B, max_len, index_head_dim), as PagedDSACache does.
    """

    names = ("c_kv", "k_pe")

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device=None):
        cls = PagedDSACache if cfg.dsa else PagedLatentCache
        self.names = cls.names
        super().__init__(cls.token_shapes(cfg), cfg.num_hidden_layers + cfg.num_nextn_predict_layers,
                         batch, max_len, dtype, device)

    def update_indexer(self, layer, keys):
        """DSA: store the indexer keys (B, T, index_head_dim); -> all of them (B, S, index_head_dim), the mask."""
        return self._store(layer, "k_index", keys), self._mask(keys.shape[1], keys.device)

    def update_selected(self, layer, c_kv, k_pe, positions):
        """DSA: store the latents; -> those at positions (B, T, k): (B, T, k, kv_lora_rank), (B, T, k, rope)."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None, None]
        return self._store(layer, "c_kv", c_kv)[rows, positions], self._store(layer, "k_pe", k_pe)[rows, positions]


class KVCache(_ContiguousCache):
    """A contiguous K/V cache for grouped-query attention: per layer, k and v (B, max_len, n_kv_heads, head_dim).
    PagedKVCache (above, the engine's) implements the same `update`."""

    names = ("k", "v")

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device=None):
        super().__init__(PagedKVCache.token_shapes(cfg), cfg.num_hidden_layers, batch, max_len, dtype, device)
