"""The paged latent KV cache of the engine: MLA's latent only, in fixed-size blocks, with prefix reuse.

What is cached (DeepSeek-V2 Section 2.1.2): per token and per layer, the normalised latent c_kv (kv_lora_rank) and
the roped shared key k_pe (qk_rope_head_dim), nothing else: 576 elements per token per layer for V3, where
transformers' cache holds 40,960 (per-head K and V).

Layout (the PagedAttention idea of vLLM, Kwon et al. 2023): each layer owns one pool of `num_blocks` blocks of
`block_size` token slots, c_kv (num_blocks, block_size, kv_lora_rank) and k_pe (num_blocks, block_size, rope).
A sequence holds a list of block ids (its block table); slot = block * block_size + offset. Block 0 is a scratch
block that is never handed out: padding tokens write there and padded reads point there (always masked).

Prefix cache: a full block is named by a hash chain, key_k = (hash(key_{k-1}), the block's tokens), so a block
is only reused when every token before it matches too. Blocks carry reference counts; a cached block nobody
references stays in the pool (LRU order) until the allocator needs it back.

Per step the engine computes, once for all layers, the slots each new token writes, the slots each sequence reads
(its blocks gathered into a padded (B, S) view) and the attention mask; `update(layer, ...)` (the cache protocol of
nanoseek.model.mla) then does one scatter and one gather per layer.

LatentCache (at the end) is the contiguous, unpaged cache of the same protocol, for tests and simple generation.
"""

from __future__ import annotations

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
            raise RuntimeError("latent cache out of blocks (the engine reserves blocks before admitting requests; "
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


class PagedLatentCache:
    """Per-layer pools of c_kv and k_pe blocks, and the per-step view that MLA attends through."""

    def __init__(self, cfg: ModelConfig, num_layers: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        r, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, block_size)
        # one pool per layer (the MTP layer included when used): (num_blocks, block_size, dim)
        self.c_kv = [torch.zeros(num_blocks, block_size, r, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k_pe = [torch.zeros(num_blocks, block_size, rope, dtype=dtype, device=device) for _ in range(num_layers)]
        self.bytes_per_token = num_layers * (r + rope) * self.c_kv[0].element_size()
        self._write = self._read = self._mask = None

    def set_step(self, write_slots: torch.Tensor, read_slots: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Fix the indices of this forward for every layer.

        write_slots (B*T,): slot of each new token (padding -> scratch slot 0); read_slots (B, S): the slots each
        sequence attends over, padded with 0; mask (B, 1, T, S) bool, True = may attend (None: all S visible).
        """
        self._write, self._read, self._mask = write_slots, read_slots, mask

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Store this step's latents (B, T, .) and return every visible latent (B, S, .) and the mask."""
        B, S = self._read.shape
        flat_c = self.c_kv[layer].view(-1, c_kv.shape[-1])
        flat_k = self.k_pe[layer].view(-1, k_pe.shape[-1])
        flat_c.index_copy_(0, self._write, c_kv.reshape(-1, c_kv.shape[-1]))
        flat_k.index_copy_(0, self._write, k_pe.reshape(-1, k_pe.shape[-1]))
        read = self._read.view(-1)
        return (flat_c.index_select(0, read).view(B, S, -1), flat_k.index_select(0, read).view(B, S, -1),
                self._mask)


class LatentCache:
    """A contiguous latent KV cache for B sequences that advance together (tests, simple generation).

    Holds, per layer, c_kv (B, max_len, kv_lora_rank) and k_pe (B, max_len, qk_rope_head_dim) and nothing else:
    that is all MLA needs. PagedLatentCache (above, the engine's) implements the same `update`.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device=None):
        n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.c_kv = torch.zeros(n, batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(n, batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.length = 0   # tokens already cached (the same for every layer once a forward finishes)
        self._new = 0

    def update(self, layer, c_kv, k_pe):
        T = c_kv.shape[1]
        start = self.length
        self.c_kv[layer, :, start:start + T] = c_kv
        self.k_pe[layer, :, start:start + T] = k_pe
        self._new = T
        S = start + T
        mask = None
        if T > 1:  # (T, S): the new tokens see the cached ones and, causally, each other
            mask = torch.ones(T, S, dtype=torch.bool, device=c_kv.device).tril(start)
        return self.c_kv[layer, :, :S], self.k_pe[layer, :, :S], mask

    def advance(self):
        """Call after each forward: the tokens just written become part of the context."""
        self.length += self._new
        self._new = 0
