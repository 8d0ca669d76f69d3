"""FlashMLA: absorbed-MLA decode attention over the paged latent cache as one Triton kernel.

The torch path (mla.py, MLA.latent_attention) first gathers each sequence's latents from the cache's blocks into a
padded (B, S, kv_lora_rank + rope) tensor, then runs scores, mask, softmax and the weighted sum as separate ops, each
writing its (B, T, H, S) result to memory. This kernel does what DeepSeek's FlashMLA does for decoding: every
program takes one query position and a group of heads, walks that sequence's blocks through its block table (no
gathered copy of the cache), and keeps a running max and sum (online softmax, as in FlashAttention) so that the
scores never leave registers. The output stays in latent space, (B, T, H, kv_lora_rank); MLA applies W_UV after.

Per query row (b, t), with q_lat = q_nope W_UK (the query absorbed into latent space, DeepSeek-V2 Section 2.1.2):
    s_j = softmax_scale * (q_lat . c_kv_j + q_pe . k_pe_j)  for the visible positions j < kv_len[b, t]
    out = sum_j softmax(s)_j c_kv_j
which is multi-query attention with one 576-wide "key" [c_kv, k_pe] and the 512-wide latent as "value" (V3 sizes).

Visibility is a prefix per query (kv_len[b, t] positions of row b): causal within a chunk and the row's length,
what PagedCache.plan() produces. tests/test_flash_mla.py checks the kernel equals the torch path under Triton's
interpreter (TRITON_INTERPRET=1, on the CPU); on CUDA MLA uses it by default (`use_kernel`), and
NANOSEEK_FLASH_MLA=0 forces the torch path (=1 forces the kernel, e.g. on the CPU under the interpreter).
"""

import os

import torch

try:                                    # triton is optional: on CUDA it ships with torch; here a test dependency
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None
constexpr = tl.constexpr if tl is not None else int    # the kernel's compile-time arguments
# tl.max, tl.sum and tl.zeros are @triton.jit functions, wrapped for the GPU or for the interpreter once, when
# triton is imported, and the interpreter cannot call the GPU kind. The kernel uses tl.reduce with triton's own
# combine functions (the interpreter and the compiler recognise both) and tl.full instead, so that it also runs
# under TRITON_INTERPRET=1 in a process that imported triton before the variable was set (a test session).
_max, _sum = (tl.standard._elementwise_max, tl.standard._sum_combine) if tl is not None else (None, None)

# "auto": the kernel on CUDA when triton imports; "0": always the torch path; "1": always the kernel
MODE = os.environ.get("NANOSEEK_FLASH_MLA", "auto")


def available() -> bool:
    """Whether the kernel can run at all here (triton imports); bench/ and GPU checks skip it otherwise."""
    return triton is not None


def use_kernel(cache, device: torch.device) -> bool:
    """Whether MLA's absorbed path runs this kernel: the cache must be paged (it has `update_paged`), and then
    MODE decides (auto: on CUDA with triton importable)."""
    if MODE == "0" or not hasattr(cache, "update_paged"):
        return False
    if MODE == "1":
        return True
    return device.type == "cuda" and triton is not None


def _flash_mla_kernel(q_lat, q_pe, c_kv, k_pe, table, kv_len, out, softmax_scale,
                      T, n_heads, rank, rope, max_blocks,
                      PAGE: constexpr, BLOCK_H: constexpr, BLOCK_N: constexpr, BLOCK_R: constexpr,
                      BLOCK_ROPE: constexpr):
    """One program: query row (b, t) = program 0, heads [BLOCK_H * program 1, ...). Tensors are contiguous:
    q_lat, out (B*T, H, rank); q_pe (B*T, H, rope); c_kv (num_blocks * PAGE, rank); k_pe (num_blocks * PAGE, rope);
    table (B, max_blocks) block ids; kv_len (B*T,) visible positions of each query."""
    row = tl.program_id(0)
    b = row // T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                      # (BLOCK_H,)
    dr, dp = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_ROPE)
    h_ok, r_ok, p_ok = heads < n_heads, dr < rank, dp < rope
    q_row = row.to(tl.int64) * n_heads + heads                                        # (BLOCK_H,) row of (B*T*H, .)
    ql = tl.load(q_lat + q_row[:, None] * rank + dr[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    qp = tl.load(q_pe + q_row[:, None] * rope + dp[None, :], mask=h_ok[:, None] & p_ok[None, :], other=0.0)
    n = tl.load(kv_len + row)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)                                  # running max of the scores
    l = tl.full([BLOCK_H], 0.0, tl.float32)                                            # running sum of exp(s - m)
    acc = tl.full([BLOCK_H, BLOCK_R], 0.0, tl.float32)                                 # running sum of p * c_kv
    for start in range(0, n, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)                                              # (BLOCK_N,) positions
        j_ok = j < n
        block = tl.load(table + b * max_blocks + j // PAGE, mask=j_ok, other=0)     # through the block table
        slot = block.to(tl.int64) * PAGE + j % PAGE
        c = tl.load(c_kv + slot[:, None] * rank + dr[None, :], mask=j_ok[:, None] & r_ok[None, :], other=0.0)
        kp = tl.load(k_pe + slot[:, None] * rope + dp[None, :], mask=j_ok[:, None] & p_ok[None, :], other=0.0)
        s = tl.dot(ql, tl.trans(c), input_precision="ieee")                           # (BLOCK_H, BLOCK_N)
        s = tl.dot(qp, tl.trans(kp), acc=s, input_precision="ieee") * softmax_scale
        s = tl.where(j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(s, 1, _max))   # finite: position `start` is always visible
        alpha = tl.exp(m - m_new)                       # rescales what was summed under the old max
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.reduce(p, 1, _sum)
        acc = tl.dot(p.to(c.dtype), c, acc=acc * alpha[:, None], input_precision="ieee")   # (BLOCK_H, BLOCK_R)
        m = m_new
    acc = acc / l[:, None]
    tl.store(out + q_row[:, None] * rank + dr[None, :], acc.to(out.dtype.element_ty),
             mask=h_ok[:, None] & r_ok[None, :])


_KERNELS: dict[str, object] = {}     # device type -> the wrapped kernel


def _kernel(device_type: str):
    """The kernel wrapped for the GPU, or for Triton's interpreter on the CPU. triton.jit reads TRITON_INTERPRET
    when it wraps, so the two are kept apart (a test may interpret in a process that already compiled for the GPU)."""
    if device_type not in _KERNELS:
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError("flash_mla got CPU tensors: the Triton kernel runs on a GPU, or on the CPU only under "
                               "Triton's interpreter (TRITON_INTERPRET=1); NANOSEEK_FLASH_MLA=0 selects the torch path")
        _KERNELS[device_type] = triton.jit(_flash_mla_kernel)
    return _KERNELS[device_type]


if triton is not None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    _kernel("cuda")     # wrapped now, not inside a torch.compile trace (infer/compiled.py captures the decode step)


def flash_mla(q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, table: torch.Tensor,
              kv_len: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Absorbed MLA attention read through the block table -> the latent output (B, T, H, kv_lora_rank).

    q_lat (B, T, H, r): q_nope absorbed by W_UK; q_pe (B, T, H, rope): roped; c_kv (num_blocks, block_size, r) and
    k_pe (num_blocks, block_size, rope): one layer's pools, contiguous; table (B, max_blocks): each row's block ids;
    kv_len (B, T): how many leading positions of its row each query sees (>= 1)."""
    if triton is None:
        raise RuntimeError("flash_mla needs triton (pip install triton; on the CPU it runs under TRITON_INTERPRET=1); "
                           "NANOSEEK_FLASH_MLA=0 selects the torch path")
    B, T, H, r = q_lat.shape
    num_blocks, page, rope = k_pe.shape
    out = torch.empty(B, T, H, r, dtype=c_kv.dtype, device=q_lat.device)
    tiles = tile_sizes(H, r, rope, c_kv.element_size())
    grid = (B * T, triton.cdiv(H, tiles["BLOCK_H"]))
    _kernel(q_lat.device.type)[grid](
        q_lat.contiguous(), q_pe.contiguous(), c_kv, k_pe, table.contiguous(), kv_len.reshape(-1).contiguous(), out,
        softmax_scale, T, H, r, rope, table.shape[1], PAGE=page, **tiles)
    return out


def tile_sizes(n_heads: int, rank: int, rope: int, itemsize: int) -> dict[str, int]:
    """The kernel's compile-time tile sizes. tl.dot wants >= 16 rows and columns (padded heads, positions and
    columns are masked). Latent rows of more than 1 KB (V3's 512 in float32) get 16 heads x 16 positions so that
    the float32 accumulator and the staged c_kv tiles fit registers and shared memory (at V3 sizes, compiled for
    sm_90: 75-78 KB of shared memory in float32 and bfloat16). Not tuned on a GPU."""
    wide = rank * itemsize > 1024
    return dict(BLOCK_H=max(16, min(16 if wide else 32, triton.next_power_of_2(n_heads))), BLOCK_N=16 if wide else 32,
                BLOCK_R=max(16, triton.next_power_of_2(rank)), BLOCK_ROPE=max(16, triton.next_power_of_2(rope)))
