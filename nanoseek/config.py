"""ModelConfig: every hyper-parameter of a model, named as transformers names them.

Two kinds of model share the one dataclass. DeepSeek-V2/V3 (`model_type` deepseek_v2 / deepseek_v3): Multi-head
Latent Attention, DeepSeekMoE, multi-token prediction. The dense families of R1's distilled students (qwen2, llama,
qwen3): grouped-query attention and a SwiGLU MLP. Field names are those of transformers' config classes
(DeepseekV3Config, DeepseekV2Config, Qwen2Config, LlamaConfig, Qwen3Config), so a published `config.json` maps onto
this dataclass one to one (`ModelConfig.from_hf`) and back (`to_hf`); the fields of the other kind are ignored and
not written. `cfg.attention` ("mla" or "gqa") is what callers branch on.

The presets hold published shapes: V2-Lite, V2 and V3 (DeepSeek-V2 report Appendix, DeepSeek-V3 report Section
4.2); the distilled students (DeepSeek-R1 report Section 2.4: Qwen2.5-Math-1.5B/7B widths, Llama-3.1-8B with its
llama3 rope scaling; Qwen3-8B, the base of R1-0528's student); and small shapes of our own for tests, the CPU demo
and a one-GPU run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

DEEPSEEK = ("deepseek_v3", "deepseek_v2", "deepseek_v32")   # MLA + DeepSeekMoE (+ MTP); V3.2 adds DSA
V4 = "deepseek_v4"                           # hybrid compressed attention + mHC + hash/top-k MoE (model/v4.py)
DENSE = ("qwen2", "llama", "qwen3")          # grouped-query attention + SwiGLU MLP
ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                 "deepseek_v32": "DeepseekV32ForCausalLM", "deepseek_v4": "DeepseekV4ForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# what a dense family's config.json holds (besides rope_scaling / rope_parameters, architectures and the keys we
# do not model, kept in `extra`); qwen2 has no attention_bias: its q/k/v always carry a bias, o_proj never does
_DENSE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
               "rope_theta", "rms_norm_eps", "initializer_range", "tie_word_embeddings", "attention_dropout",
               "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype")
_DENSE_ONLY = ("head_dim",)                  # not written for DeepSeek (transformers derives its own)
_DSA_ONLY = ("index_n_heads", "index_head_dim", "index_topk")   # written for deepseek_v32 only
# what deepseek_v4's config.json holds (transformers' DeepseekV4Config field names); the rest of `extra` is kept
_V4_KEYS = ("model_type", "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "q_lora_rank", "num_experts_per_tok",
            "n_routed_experts", "n_shared_experts", "scoring_func", "norm_topk_prob", "routed_scaling_factor",
            "max_position_embeddings", "rope_theta", "layer_types", "compress_rates", "compress_rope_theta",
            "hc_mult", "hc_sinkhorn_iters", "hc_eps", "mlp_layer_types", "swiglu_limit", "sliding_window",
            "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk", "num_nextn_predict_layers",
            "hidden_act", "initializer_range", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
            "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype")
V4_ONLY = ("layer_types", "compress_rates", "compress_rope_theta", "sliding_window", "hc_mult", "hc_sinkhorn_iters",
           "hc_eps", "mlp_layer_types", "swiglu_limit", "o_groups", "o_lora_rank")   # fields of deepseek_v4 alone
V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
_ROPE_TYPES = {"deepseek": (None, "default", "yarn"), "dense": (None, "default", "yarn", "llama3")}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"          # deepseek_v3 | deepseek_v32 | deepseek_v2 | qwen2 | llama | qwen3
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432           # width of the dense SwiGLU MLP (DeepSeek: layers < first_k_dense_replace)
    moe_intermediate_size: int = 2048        # width of one routed (or shared) expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128           # GQA: key/value heads, each shared by a group of query heads (MLA: unused)
    head_dim: int | None = None              # GQA: width of one q/k/v head; None: hidden_size // heads (qwen3 sets it)
    # --- MLA (DeepSeek-V2 Section 2.1) ---
    q_lora_rank: int | None = 1536           # None: a single q_proj (V2-Lite)
    kv_lora_rank: int = 512                  # d_c, the latent that the cache holds
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64               # the decoupled RoPE part, shared k_pe across heads
    v_head_dim: int = 128
    # --- DeepSeek Sparse Attention (V3.2, arXiv 2512.02556 Section 2.1; deepseek_v32 only): the lightning indexer
    index_n_heads: int = 64                  # indexer query heads (small: the indexer scores every earlier token)
    index_head_dim: int = 128                # width of an indexer query head and of the ONE indexer key per token
    index_topk: int = 2048                   # tokens each query attends to: the top index_topk by indexer score
    # --- DeepSeek-V4 (deepseek_v4 only; transformers' DeepseekV4Config names; model/v4.py) ---
    # per layer: "sliding_attention" (the window only), "compressed_sparse_attention" (CSA: window + compressed
    # entries picked by the lightning indexer) or "heavily_compressed_attention" (HCA: window + all compressed
    # entries); None: transformers' default (2 HCA, then HCA/CSA alternating)
    layer_types: list | None = None
    compress_rates: dict | None = None       # tokens per compressed entry: {"compressed_sparse_attention": 4, "heavily_...": 128}
    compress_rope_theta: float = 160000.0    # RoPE base of the CSA/HCA layers (sliding layers use rope_theta)
    sliding_window: int = 128                # n_win: keys every query sees uncompressed (itself and the 127 before)
    hc_mult: int = 4                         # mHC: parallel residual streams
    hc_sinkhorn_iters: int = 20              # Sinkhorn-Knopp iterations making the stream mixing doubly stochastic
    hc_eps: float = 1e-6
    mlp_layer_types: list | None = None      # per layer "hash_moe" (token id -> experts table) or "moe"; None: 3 hash
    swiglu_limit: float = 10.0               # routed and shared experts clamp gate (above) and up (both sides)
    o_groups: int = 8                        # grouped output projection: head groups ...
    o_lora_rank: int = 1024                  # ... each projected to this width before o_b_proj mixes them
    # --- DeepSeekMoE (V2 Section 2.2, V3 Section 2.1.2); None for the dense families ---
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8      # K_r, routed experts per token
    n_group: int | None = 8                  # expert groups (node-limited routing)
    topk_group: int | None = 4               # groups kept per token
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True              # V3 normalises the top-k weights; V2 does not
    topk_method: str = "noaux_tc"            # greedy | group_limited_greedy | noaux_tc
    scoring_func: str = "sigmoid"            # softmax (V2) | sigmoid (V3) | sqrtsoftplus (V4)
    first_k_dense_replace: int = 3           # the first k layers use a dense MLP
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 0.0001           # sequence-wise balance loss weight (V3 eq. 17-20)
    seq_aux: bool = True
    # --- multi-token prediction (V3 Section 2.2) ---
    num_nextn_predict_layers: int = 0
    # --- positions: RoPE (+ YaRN, or llama3's scaling) ---
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None         # {"type": "yarn" | "llama3", "factor", "original_max_position_embeddings", ...}
    # True: the weights rotate adjacent pairs (DeepSeek as published); False: half-split pairs (x_i, x_{i+d/2}),
    # which the dense families always use. None: the family's own layout.
    rope_interleave: bool | None = None
    # --- the rest ---
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False             # DeepSeek, llama, qwen3: bias on q/k/v/o projections (qwen2: see above)
    attention_dropout: float = 0.0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    quantization_config: dict | None = None  # FP8 block quantisation of published V3/R1 (dequantised on load)
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys of config.json, written back by to_hf

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not supported: expected one of "
                             f"{', '.join(ARCHITECTURES)}")
        if self.q_lora_rank == 0:
            self.q_lora_rank = None
        rope_type = (self.rope_scaling or {}).get("type", (self.rope_scaling or {}).get("rope_type"))
        if self.model_type == V4:
            self._check_v4(rope_type)
            return
        if self.attention == "gqa":
            self._check_dense(rope_type)
            return
        if self.rope_interleave is None:
            self.rope_interleave = True
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"topk_method {self.topk_method!r}: expected greedy, group_limited_greedy or noaux_tc")
        if rope_type not in _ROPE_TYPES["deepseek"]:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported: DeepSeek models use 'yarn' (or none)")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func {self.scoring_func!r}: expected softmax or sigmoid")
        if self.n_routed_experts and self.n_group and self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if self.n_routed_experts and self.num_experts_per_tok and self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} > n_routed_experts={self.n_routed_experts}")
        if self.dsa:
            self._check_dsa()

    def _check_v4(self, rope_type):
        """deepseek_v4: fill the per-layer schedules as transformers does, and refuse what model/v4.py does not
        compute."""
        n = self.num_hidden_layers
        self.rope_interleave = True               # V4 rotates interleaved pairs of the trailing rope dims
        self.n_group = self.topk_group = 1        # no group-limited routing
        self.first_k_dense_replace = 0            # every layer is MoE
        if self.head_dim is None:
            self.head_dim = 512
        if self.compress_rates is None:
            self.compress_rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
        if self.layer_types is None:
            alternate = ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
                         for i in range(max(n - 2, 0))]
            self.layer_types = ["heavily_compressed_attention"] * min(n, 2) + alternate
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["hash_moe"] * min(n, 3) + ["moe"] * max(n - 3, 0)
        for name, types, allowed in (("layer_types", self.layer_types, V4_LAYER_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, ("hash_moe", "moe"))):
            if len(types) != n or any(t not in allowed for t in types):
                raise ValueError(f"{name}={types}: expected num_hidden_layers={n} entries among {allowed}")
        if self.scoring_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            raise ValueError(f"scoring_func {self.scoring_func!r}: expected sqrtsoftplus, sigmoid or softmax")
        if rope_type not in _ROPE_TYPES["deepseek"]:
            raise ValueError(f"rope_scaling type {rope_type!r}: deepseek_v4's compressed layers use 'yarn' (or none)")
        if self.num_key_value_heads != 1:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads}: V4 attention has one shared "
                             f"key=value head (set it to 1)")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ValueError(f"o_groups={self.o_groups} does not divide num_attention_heads x head_dim")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > min(self.head_dim, self.index_head_dim):
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and fit head_dim and "
                             f"index_head_dim (the rotated trailing dims of each)")

    def _check_dsa(self):
        """DeepSeek-V3.2: the indexer reads MLA's query latent and rotates its first qk_rope_head_dim dims; the rest
        is V3 as transformers' DeepseekV32 builds it (interleaved MLA rope, noaux_tc sigmoid routing)."""
        if not self.q_lora_rank:
            raise ValueError("deepseek_v32 needs q_lora_rank: the lightning indexer's queries are projected from "
                             "MLA's query latent (set q_lora_rank, e.g. 1536 as published)")
        if not self.qk_rope_head_dim <= self.index_head_dim or self.qk_rope_head_dim % 2:
            raise ValueError(f"index_head_dim={self.index_head_dim} must hold the qk_rope_head_dim="
                             f"{self.qk_rope_head_dim} rotated dims (an even number) of each indexer head")
        if min(self.index_n_heads, self.index_head_dim, self.index_topk) < 1:
            raise ValueError(f"index_n_heads={self.index_n_heads}, index_head_dim={self.index_head_dim} and "
                             f"index_topk={self.index_topk} must be >= 1")
        if not self.rope_interleave:
            raise ValueError("deepseek_v32 rotates MLA's rope dims in interleaved pairs (rope_interleave=True); "
                             "only the indexer uses half-split pairs")
        if (self.topk_method, self.scoring_func) != ("noaux_tc", "sigmoid"):
            raise ValueError(f"deepseek_v32 routes with noaux_tc and sigmoid scores (as V3); got topk_method="
                             f"{self.topk_method!r}, scoring_func={self.scoring_func!r}")

    def _check_dense(self, rope_type):
        """The dense families: no experts, no MTP, half-split rope, whole groups of query heads per K/V head."""
        mt = self.model_type
        self.n_routed_experts = None  # a dense family has no routed experts, whatever the DeepSeek defaults say
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_interleave is None:
            self.rope_interleave = False
        if self.rope_interleave:
            raise ValueError(f"rope_interleave=True is not a {mt} layout: its q/k weights rotate half-split pairs")
        if self.num_nextn_predict_layers:
            raise ValueError(f"num_nextn_predict_layers={self.num_nextn_predict_layers}: multi-token prediction "
                             f"is a DeepSeek-V3 module; a {mt} model has none (set it to 0)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}: grouped-query attention shares each "
                             f"key/value head among a whole group of query heads")
        if rope_type not in _ROPE_TYPES["dense"]:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported for {mt}: expected 'llama3', "
                             f"'yarn' or none")
        if rope_type == "llama3" and any(k not in self.rope_scaling for k in _LLAMA3_KEYS):
            raise ValueError(f"rope_scaling of type 'llama3' needs {', '.join(_LLAMA3_KEYS)}; got "
                             f"{sorted(self.rope_scaling)}")

    # ------------------------------------------------------------------ derived values
    @property
    def attention(self) -> str:
        """"mla" (DeepSeek: Multi-head Latent Attention) or "gqa" (the dense families: grouped-query attention)."""
        if self.model_type == V4:
            return "hybrid"   # V4: sliding window + compressed (CSA / HCA) attention, model/v4.py
        return "mla" if self.model_type in DEEPSEEK else "gqa"

    @property
    def dsa(self) -> bool:
        """DeepSeek Sparse Attention: a lightning indexer in every attention layer picks the index_topk tokens
        each query attends to (model_type deepseek_v32)."""
        return self.model_type == "deepseek_v32"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, i: int) -> bool:
        return self.is_moe and i >= self.first_k_dense_replace and i % max(self.moe_layer_freq, 1) == 0

    def cache_entries(self, layer: int) -> list[tuple[int, int, int]]:
        """What layer `layer`'s KV cache grows by with the context: (tokens per entry, its elements, of which RoPE
        dims) for each kind of entry. MLA: the latent, kv_lora_rank + qk_rope_head_dim, per token (+ the indexer
        key, index_head_dim, with DSA); GQA: keys and values, 2 x num_key_value_heads x head_dim. V4: a CSA layer
        one head_dim entry and one indexer key per compress_rates[CSA] (4) tokens, an HCA layer one entry per 128;
        V4's window (the last sliding_window raw entries of every layer) does not grow and is not here.
        The one account of the cache: info.cache_bytes and V4Cache.bytes_per_token are built on it."""
        if self.attention == "gqa":
            return [(1, 2 * self.num_key_value_heads * self.head_dim, 0)]
        if self.attention == "mla":
            latent = (1, self.kv_lora_rank + self.qk_rope_head_dim, self.qk_rope_head_dim)
            return [latent] + ([(1, self.index_head_dim, 0)] if self.dsa else [])
        kind = self.layer_types[layer]
        if kind == "sliding_attention":
            return []
        entry = (self.compress_rates[kind], self.head_dim, self.qk_rope_head_dim)
        return [entry] + ([(entry[0], self.index_head_dim, 0)] if kind == "compressed_sparse_attention" else [])

    @property
    def kv_cache_elems_per_token(self) -> int | float:
        """Elements one token costs in the cache, per layer, in the long run (cache_entries; V4: the mean over its
        layers, so that x num_hidden_layers is a token's cost; a fraction when an entry's elements do not divide
        by its rate)."""
        L = self.num_hidden_layers
        per = sum(Fraction(n, rate) for i in range(L) for rate, n, _ in self.cache_entries(i)) / L
        return int(per) if per.denominator == 1 else float(per)

    @property
    def mha_cache_elems_per_token(self) -> int:
        """Per layer, what a classic MHA cache of the same heads would hold: K (heads x qk_head_dim) + V."""
        if self.attention == "gqa":
            return 2 * self.num_attention_heads * self.head_dim
        return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)

    def _attention_params(self) -> int:
        """Parameters of one attention module (projections, their biases, q/k norms)."""
        h, H = self.hidden_size, self.num_attention_heads
        if self.attention == "gqa":
            q, kv = H * self.head_dim, self.num_key_value_heads * self.head_dim
            n = 2 * h * q + 2 * h * kv                                        # q_proj, o_proj, k_proj, v_proj
            if self.model_type == "qwen2":
                n += q + 2 * kv                                               # q/k/v biases
            elif self.attention_bias:
                n += q + 2 * kv + h
            return n + (2 * self.head_dim if self.model_type == "qwen3" else 0)   # q_norm, k_norm
        if self.q_lora_rank:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        else:
            q = h * H * self.qk_head_dim
        kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + H * self.v_head_dim * h + self._indexer_params()

    def _indexer_params(self) -> int:
        """The lightning indexer of one layer (DSA): wq_b, wk, k_norm (LayerNorm: weight and bias), weights_proj."""
        if not self.dsa:
            return 0
        n, d, h = self.index_n_heads, self.index_head_dim, self.hidden_size
        return self.q_lora_rank * n * d + h * d + 2 * d + h * n

    def num_params(self, include_mtp: bool = False) -> dict:
        """Total and activated (per token) parameter counts, computed from the shapes alone.

        Activated counts what a token multiplies through: attention, dense MLPs, the gate, shared experts,
        num_experts_per_tok routed experts per MoE layer, norms and the output head; the embedding table is a lookup
        and is not counted. This reproduces the reports' 37B (V3) and 2.4B (V2-Lite) activated parameters.
        """
        if self.model_type == V4:
            return self._v4_num_params(include_mtp)
        h, L = self.hidden_size, self.num_hidden_layers
        attn = self._attention_params()
        norms = 2 * h
        dense = 3 * h * self.intermediate_size
        expert = 3 * h * self.moe_intermediate_size
        if self.is_moe:
            shared = (self.n_shared_experts or 0) * expert
            gate = self.n_routed_experts * h + (self.n_routed_experts if self.topk_method == "noaux_tc" else 0)
            moe_total = gate + shared + self.n_routed_experts * expert
            moe_active = gate + shared + self.num_experts_per_tok * expert
        total = active = 0
        for i in range(L):
            total += attn + norms
            active += attn + norms
            if self.is_moe_layer(i):
                total += moe_total
                active += moe_active
            else:
                total += dense
                active += dense
        emb = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        total += emb + head + h
        active += self.vocab_size * h + h  # the head's matmul, whether or not it shares the embedding's matrix
        if include_mtp and self.num_nextn_predict_layers:
            # enorm + hnorm + eh_proj + one MoE block + shared_head.norm (embedding and head are shared)
            block = attn + norms + (moe_total if self.is_moe else dense)
            total += (2 * h + 2 * h * h + block + h) * self.num_nextn_predict_layers
        return {"total": total, "activated": active}

    def _v4_attention_params(self, layer_type: str) -> int:
        """One V4 attention module: low-rank queries, the one key=value head, grouped output projection, sinks, and
        the layer type's compressor (CSA's with its lightning indexer)."""
        h, H, d, q = self.hidden_size, self.num_attention_heads, self.head_dim, self.q_lora_rank
        n = h * q + q + q * H * d + h * d + d                                # q_a, q_a_norm, q_b, kv_proj, kv_norm
        n += self.o_lora_rank * H * d + self.o_groups * self.o_lora_rank * h + H     # o_a, o_b, sinks
        if layer_type == "sliding_attention":
            return n
        m = self.compress_rates[layer_type]
        if layer_type == "heavily_compressed_attention":
            return n + 2 * h * d + m * d + d                                 # kv/gate projections, position bias, norm
        di, nh = self.index_head_dim, self.index_n_heads
        n += 4 * h * d + 2 * m * d + d                                       # CSA: two overlapping series (2 d)
        return n + 4 * h * di + 2 * m * di + di + q * nh * di + h * nh       # the indexer's compressor, q_b, weights

    def _v4_num_params(self, include_mtp: bool) -> dict:
        """num_params for deepseek_v4: every layer is MoE (hash-routed ones have no routing bias), each block has
        two mHC mappings (attention and MoE sides) and the head collapses the streams with one more."""
        h, hc, E = self.hidden_size, self.hc_mult, self.n_routed_experts
        expert = 3 * h * self.moe_intermediate_size
        mhc = 2 * ((2 + hc) * hc * hc * h + (2 + hc) * hc + 3)
        total = active = 0
        for attn_type, mlp_type in zip(self.layer_types, self.mlp_layer_types):
            shared = E * h + (E if mlp_type == "moe" else 0) + self.n_shared_experts * expert + mhc + 2 * h
            attn = self._v4_attention_params(attn_type)
            total += attn + shared + E * expert
            active += attn + shared + self.num_experts_per_tok * expert
        tail = h + hc * hc * h + hc + 1                                       # final norm, hc_head
        total += 2 * self.vocab_size * h + tail
        active += self.vocab_size * h + tail
        if include_mtp and self.num_nextn_predict_layers:  # e/h projections and norms + a sliding-window MoE block
            block = self._v4_attention_params("sliding_attention") + E * h + E + (E + 1) * expert + mhc + 2 * h
            total += (2 * h * h + 3 * h + block + hc * hc * h + hc + 1) * self.num_nextn_predict_layers
        return {"total": total, "activated": active}

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict: published configs and transformers >= 5 (`rope_parameters`)."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        mt = d.get("model_type", "deepseek_v3")
        if mt not in ARCHITECTURES:
            raise ValueError(f"config.json has model_type={mt!r}; nanoseek reads {', '.join(ARCHITECTURES)} models")
        if mt == V4:
            _read_v4(d)
        _read_rope(d)
        if mt in DENSE:
            _read_dense(d)
        elif mt == "deepseek_v2":
            d.setdefault("topk_method", "greedy")
            d.setdefault("scoring_func", "softmax")
            d.setdefault("norm_topk_prob", False)
            # transformers' DeepseekV2 applies RoPE to interleaved pairs (complex multiply), as published
            d.setdefault("rope_interleave", True)
        else:
            d.setdefault("topk_method", "noaux_tc")
            d.setdefault("scoring_func", "sigmoid")
        if mt == "deepseek_v32":
            _read_dsa(d)
        if mt in DEEPSEEK and d.get("n_routed_experts") is None:
            d["n_routed_experts"] = None
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        if mt != V4:   # V4's fields in another family's config (Qwen's inert sliding_window, layer_types) are its own
            known -= set(V4_ONLY)
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers (>= 5) and published-style loaders both read."""
        if self.model_type == V4:
            return self._v4_to_hf()
        if self.attention == "gqa":
            d = {k: getattr(self, k) for k in _DENSE_KEYS}
            if self.model_type != "qwen2":
                d["attention_bias"] = self.attention_bias
        else:
            skip = ("extra", *_DENSE_ONLY, *(() if self.dsa else _DSA_ONLY))
            d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
            d["q_lora_rank"] = self.q_lora_rank
        for k in ("torch_dtype", "quantization_config"):
            if k in d and d[k] is None:
                d.pop(k)
        # transformers >= 5 reads rope_parameters; older readers and vLLM read rope_theta / rope_scaling
        rp = {"rope_theta": self.rope_theta, "rope_type": "default"}
        d["rope_scaling"] = None
        if self.rope_scaling:
            rs = dict(self.rope_scaling)
            rtype = rs.pop("type", rs.pop("rope_type", "yarn"))
            rp.update({k: v for k, v in rs.items() if k != "rope_type"})
            rp["rope_type"] = rtype
            # DeepSeek's published configs say "type"; Llama's and Qwen's say "rope_type"
            d["rope_scaling"] = {"type": rtype, **rs} if self.attention == "mla" else {"rope_type": rtype, **rs}
        d["rope_parameters"] = rp
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d

    def _v4_to_hf(self) -> dict[str, Any]:
        """deepseek_v4's config.json, as transformers' DeepseekV4Config writes it: the rope of the sliding layers
        ("main") and of the compressed ones ("compress", with the YaRN scaling) under rope_parameters."""
        d = {k: getattr(self, k) for k in _V4_KEYS}
        if d["torch_dtype"] is None:
            d.pop("torch_dtype")
        d["partial_rotary_factor"] = self.qk_rope_head_dim / self.head_dim
        main = {"rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": d["partial_rotary_factor"]}
        compress = {"rope_type": "default", "rope_theta": self.compress_rope_theta,
                    "partial_rotary_factor": d["partial_rotary_factor"]}
        if self.rope_scaling:
            rs = dict(self.rope_scaling)
            compress.update({k: v for k, v in rs.items() if k not in ("type", "rope_type")})
            compress["rope_type"] = rs.get("type", rs.get("rope_type"))
            compress.setdefault("attention_factor", 1.0)   # V4 does not scale cos/sin by YaRN's mscale
        d["rope_parameters"] = {"main": main, "compress": compress}
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        kw = dict(PRESETS[name])
        kw.update(overrides)
        return cls(**kw)


def _read_rope(d: dict) -> None:
    """rope_parameters (transformers >= 5) and rope_scaling (published configs) -> rope_theta + rope_scaling with a
    "type" key, or None for plain RoPE. In place."""
    rp = d.pop("rope_parameters", None)
    if rp:  # transformers >= 5 keeps rope_theta and the scaling values together
        rp = dict(rp)
        d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
        rtype = rp.pop("rope_type", rp.pop("type", "default"))
        if rtype and rtype != "default" and not d.get("rope_scaling"):
            d["rope_scaling"] = {"type": rtype, **rp}
    if d.get("rope_scaling"):
        rs = dict(d["rope_scaling"])
        rs["type"] = rs.pop("rope_type", rs.get("type"))
        if rs["type"] in (None, "default"):
            rs = None
        d["rope_scaling"] = rs


def _read_dsa(d: dict) -> None:
    """deepseek_v32's config.json: transformers writes mlp_layer_types (dense or MoE per layer); we derive that
    from first_k_dense_replace, so refuse a pattern that disagrees rather than ignore it. In place."""
    types = d.get("mlp_layer_types")
    n, k = d.get("num_hidden_layers", 61), d.get("first_k_dense_replace", 3)
    if types is not None and list(types) != ["dense"] * min(k, n) + ["sparse"] * max(n - k, 0):
        raise ValueError(f"config.json has mlp_layer_types={types}, which is not first_k_dense_replace={k} dense "
                         f"layers then MoE layers: other patterns are not supported")
    layers = d.pop("layer_types", None)
    if layers is not None and set(layers) != {"indexed_attention"}:
        raise ValueError(f"config.json has layer_types={sorted(set(layers))}: every deepseek_v32 layer is "
                         f"'indexed_attention' (DSA); other layer types are not supported")
    d.pop("mlp_layer_types", None)            # derived again from first_k_dense_replace by every reader
    d.setdefault("rope_interleave", True)   # transformers' V3.2 always rotates MLA's rope dims interleaved


def _read_v4(d: dict) -> None:
    """deepseek_v4's config.json (transformers' names, and the published legacy ones transformers folds in:
    compress_ratios per layer, num_hash_layers, qk_rope_head_dim) -> our fields. In place; it
    runs before _read_rope: its rope_parameters are nested by rope kind (main, compress)."""
    rp = d.pop("rope_parameters", None) or {}
    if isinstance(rp.get("main"), dict):
        d["rope_theta"] = rp["main"].get("rope_theta", d.get("rope_theta", 10000.0))
    compress = rp.get("compress") if isinstance(rp.get("compress"), dict) else None
    if compress:
        d["compress_rope_theta"] = compress.get("rope_theta", d.get("compress_rope_theta", 160000.0))
        rtype = compress.get("rope_type", compress.get("type", "default"))
        skip = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "attention_factor")   # V4: always 1
        d["rope_scaling"] = None if rtype == "default" else {"type": rtype, **{k: v for k, v in compress.items()
                                                                               if k not in skip}}
    ratios = d.pop("compress_ratios", None)
    if d.get("layer_types") is None and ratios is not None:
        kinds = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
        d["layer_types"] = [kinds[r] for r in ratios[:d.get("num_hidden_layers", len(ratios))]]
    hashed = d.pop("num_hash_layers", None)
    if d.get("mlp_layer_types") is None and hashed is not None:
        n = d.get("num_hidden_layers", 43)
        d["mlp_layer_types"] = ["hash_moe"] * min(hashed, n) + ["moe"] * max(n - hashed, 0)
    head_dim = d.get("head_dim", 512)
    if "partial_rotary_factor" in d and d["partial_rotary_factor"] is not None:
        d["qk_rope_head_dim"] = int(head_dim * d.pop("partial_rotary_factor"))
    d.setdefault("qk_rope_head_dim", 64)
    d.setdefault("scoring_func", "sqrtsoftplus")
    d.setdefault("routed_scaling_factor", 1.5)


def _read_dense(d: dict) -> None:
    """Refuse what a dense family's config.json may switch on that we do not compute (rather than ignore it)."""
    mt = d["model_type"]
    if d.get("use_sliding_window"):
        raise ValueError(f"config.json has use_sliding_window=true: sliding-window attention of {mt} is not "
                         f"supported (the published R1 students use full attention: set it to false)")
    if d.get("mlp_bias"):
        raise ValueError("config.json has mlp_bias=true: the SwiGLU MLP here has no biases (published Llama "
                         "models have none)")
    if float(d.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError(f"config.json has partial_rotary_factor={d['partial_rotary_factor']}: only full-width "
                         f"rotary embeddings are supported for {mt}")
    if d.get("rope_interleave") is None:
        d.pop("rope_interleave", None)


_YARN_V3 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
_YARN_V2 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 0.707, "mscale_all_dim": 0.707}

# V4's compressed layers: YaRN x16 over 65,536 original positions (to 1M), on compress_rope_theta
_YARN_V4 = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}

_LLAMA3_1 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict] = {
    # tests: a few hundred thousand parameters, every feature on (q_lora, noaux_tc groups, dense first, MTP)
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=1.0,
                 first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=512,
                 rope_interleave=True),
    # the CPU speedrun: 1.3M parameters (0.76M activated), trains in minutes on two cores
    "cpu": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64,
                kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
                n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=2, routed_scaling_factor=1.0,
                first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=1024),
    # one GPU: ~100M total parameters, V3 shape scaled down
    "small": dict(vocab_size=32768, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                  num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256,
                  kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=24,
                  n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                  first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=4096),
    "v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                    num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
                    num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                    topk_method="greedy", scoring_func="softmax", first_k_dense_replace=1, aux_loss_alpha=0.001,
                    max_position_embeddings=163840, rope_scaling=_YARN_V2, bos_token_id=100000,
                    eos_token_id=100001),
    "v2": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
               moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
               q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
               routed_scaling_factor=16.0, norm_topk_prob=False, topk_method="group_limited_greedy",
               scoring_func="softmax", first_k_dense_replace=1, aux_loss_alpha=0.003,
               max_position_embeddings=163840, rope_scaling=_YARN_V2, bos_token_id=100000, eos_token_id=100001),
    "v3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
               moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
               q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
               routed_scaling_factor=2.5, norm_topk_prob=True, topk_method="noaux_tc", scoring_func="sigmoid",
               first_k_dense_replace=3, num_nextn_predict_layers=1, max_position_embeddings=163840,
               rope_scaling=_YARN_V3, bos_token_id=0, eos_token_id=1),
    # tests and small DSA experiments: "tiny" with an indexer of 4 heads x 16 that keeps 16 tokens per query
    "tiny-v3.2": dict(model_type="deepseek_v32", vocab_size=512, hidden_size=64, intermediate_size=128,
                      moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                      routed_scaling_factor=1.0, first_k_dense_replace=1, num_nextn_predict_layers=1,
                      max_position_embeddings=512, index_n_heads=4, index_head_dim=16, index_topk=16),
    # DeepSeek-V4 (Apr 2026): the published config.json files' shapes (copies of V4-Flash's and V4-Pro's, the latter
    # with its tensor listing, found through code search). num_params: Flash 284.3B / 13.3B active, Pro 1.573T (1.599T
    # with its MTP module, the published checkpoint's count of weights) / 48.9B, against the published rounded
    # 284B / 13B and 1.6T / 49B.
    # V4-Flash: layers 0-1 sliding window only, then CSA (even) / HCA (odd) alternating; top-6 of 256 experts
    "v4-flash": dict(model_type="deepseek_v4", vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048,
                     num_hidden_layers=43, num_attention_heads=64, num_key_value_heads=1, head_dim=512,
                     q_lora_rank=1024, qk_rope_head_dim=64, n_routed_experts=256, n_shared_experts=1,
                     num_experts_per_tok=6, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
                     layer_types=["sliding_attention"] * 2 + ["compressed_sparse_attention" if i % 2 == 0 else
                                                              "heavily_compressed_attention" for i in range(41)],
                     o_groups=8, o_lora_rank=1024, index_n_heads=64, index_head_dim=128, index_topk=512,
                     num_nextn_predict_layers=1, max_position_embeddings=1048576, rope_theta=10000.0,
                     rope_scaling=_YARN_V4, bos_token_id=0, eos_token_id=1),
    # V4-Pro: compress_ratios [128, 128] + [4, 128] * 29 + [4]: layers 0-1 HCA, then CSA (even) / HCA (odd) alternating
    # (30 CSA, 31 HCA; transformers' default schedule puts CSA on the odd layers); top-6 of 384 experts
    "v4-pro": dict(model_type="deepseek_v4", vocab_size=129280, hidden_size=7168, moe_intermediate_size=3072,
                   num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=1, head_dim=512,
                   q_lora_rank=1536, qk_rope_head_dim=64, n_routed_experts=384, n_shared_experts=1,
                   num_experts_per_tok=6, scoring_func="sqrtsoftplus", routed_scaling_factor=2.5, o_groups=16,
                   layer_types=["heavily_compressed_attention"] * 2 + ["compressed_sparse_attention" if i % 2 == 0 else
                                                                       "heavily_compressed_attention" for i in range(59)],
                   o_lora_rank=1024, index_n_heads=64, index_head_dim=128, index_topk=1024,
                   num_nextn_predict_layers=1, max_position_embeddings=1048576, rope_theta=10000.0,
                   rope_scaling=_YARN_V4, bos_token_id=0, eos_token_id=1),
    # tests: every V4 layer type and both routings in 4 layers; a window of 8 and compression 4 / 8, so that a
    # sequence of 40 tokens crosses the window, index_topk and several heavily compressed entries
    "tiny-v4": dict(model_type="deepseek_v4", vocab_size=512, hidden_size=64, moe_intermediate_size=32,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
                    qk_rope_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                    scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
                    layer_types=["sliding_attention", "compressed_sparse_attention",
                                 "heavily_compressed_attention", "compressed_sparse_attention"],
                    mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
                    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                    sliding_window=8, hc_mult=2, hc_sinkhorn_iters=20, o_groups=2, o_lora_rank=16,
                    index_n_heads=4, index_head_dim=16, index_topk=3, num_nextn_predict_layers=0,
                    max_position_embeddings=512),
    # --- R1's distilled students (dense; DeepSeek-R1 report Section 2.4), shapes of their published config.json
    # DeepSeek-R1-Distill-Qwen-1.5B: Qwen2.5-Math-1.5B widths, embeddings untied (1.78B; Qwen2.5-1.5B ties, 1.54B)
    "qwen-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                      num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                      max_position_embeddings=131072, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=151643, eos_token_id=151643),
    # DeepSeek-R1-Distill-Qwen-7B: Qwen2.5-Math-7B widths (7.62B)
    "qwen-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    max_position_embeddings=131072, rope_theta=10000.0, bos_token_id=151643,
                    eos_token_id=151643),
    # DeepSeek-R1-Distill-Llama-8B: Llama-3.1-8B with its llama3 rope scaling (8.03B)
    "llama-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                     rope_scaling=_LLAMA3_1, bos_token_id=128000, eos_token_id=128001),
    # Qwen3-8B, the base of DeepSeek-R1-0528-Qwen3-8B: q/k norms, head_dim 128 (8.19B)
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, rope_theta=1000000.0, bos_token_id=151643,
                     eos_token_id=151645),
    # tests: the dense families in a few hundred thousand parameters (GQA ratio 2, llama3 scaling, qwen3's head_dim)
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1),
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, rope_theta=500000.0, bos_token_id=0, eos_token_id=1,
                       rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "tiny-qwen3": dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                       max_position_embeddings=512, bos_token_id=0, eos_token_id=1),
}
# DeepSeek-V3.1 (Aug 2025) keeps V3's architecture: its published config.json repeats V3's values (vocabulary
# 129,280, YaRN factor 40 over 4,096 original positions, 163,840 positions, one MTP layer). What changed is outside
# the shapes: thinking became a switch of the chat template, and the FP8 block scales are UE8M0 powers of two
# (quantization_config scale_fmt "ue8m0", read by checkpoint.FP8Format).
PRESETS["v3.1"] = dict(PRESETS["v3"])
# DeepSeek-V3.2 (-Exp, and V3.2 as released): V3's shapes plus a lightning indexer per layer (config.json of
# deepseek-ai/DeepSeek-V3.2-Exp: index_n_heads 64, index_head_dim 128, index_topk 2048); 671B + 0.85B of indexers
PRESETS["v3.2"] = dict(PRESETS["v3"], model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048)
# `nanoseek pretrain --preset v4-tiny`: tiny-v4 with its MTP module (the published V4 models have one); tiny-v4
# itself stays without MTP, as transformers builds it (the tests compare the two implementations on it)
PRESETS["v4-tiny"] = dict(PRESETS["tiny-v4"], num_nextn_predict_layers=1)
