"""GGUF files in and out: llama.cpp's format, read into and written from transformers' names.

`ns.load("x.gguf")` (checkpoint.load hands the path to `load_gguf`) and `ns.Tokenizer.load("x.gguf")` (through
`tokenizer_files`) read a GGUF file; `nanoseek export-gguf MODEL OUT.gguf` (export_gguf.py, calling `export_gguf`)
writes one that llama.cpp and ollama run. Everything crosses over in transformers' terms: GGUF metadata <-> a
config.json dict, llama.cpp's tensor names <-> transformers' tensor names, the GGUF vocabulary <-> tokenizer.json.
So the rest of nanoseek (model/weights.py's build_from_tensors and ours_to_hf, Tokenizer.load / save) never sees
llama.cpp's conventions. Those conventions, and where each is undone:

* names: token_embd, blk.N.attn_q, ... (gguf.constants.TENSOR_NAMES): one table, `_GLOBAL` + `_LAYER`, both ways.
* llama: llama.cpp's converter permutes the rows of each q and k head so that its RoPE, which rotates adjacent
  pairs, computes what transformers' half-split RoPE does (`_half_to_adjacent`); we permute them back.
* deepseek2: kv_b_proj is stored split, as attn_k_b (transposed per head) and attn_v_b, for llama.cpp's absorbed
  MLA; routed experts are stacked into one 3-D tensor per projection; the routing bias is exp_probs_b; RoPE pairs
  are adjacent (rope_interleave=True), so a half-split model's rope rows are permuted on export; MTP layers are
  not written (llama.cpp's deepseek2 does not run them).
* llama3 rope scaling is no metadata key but a tensor of per-frequency divisors, rope_freqs, from which the four
  numbers of transformers' rope_scaling are recovered (`_llama3_scaling`).
* the vocabulary: a token list with types (normal / control / user-defined), merges as "a b" strings, and the
  pre-tokenizer as a name (tokenizer.ggml.pre) standing for a list of split regexes (`PRE_TOKENIZERS`).

Weights are dequantised by the gguf library (gguf.quants: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to
Q6_K, the IQ types), one tensor at a time, so loading streams as it does from safetensors.

This module imports neither checkpoint.py nor tokenizer.py, which hand .gguf paths to it (an import either way
would be a cycle); the export-gguf command, which loads folders through checkpoint.py, is export_gguf.py.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

from .config import ModelConfig
from .errors import UsageError
from .model.transformer import Transformer
from .model.weights import CheckpointError, build_from_tensors, ours_to_hf

T = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType

# model_type -> llama.cpp's architecture (general.architecture)
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2"}

# llama.cpp's tensor -> transformers' name (without .weight / .bias)
_GLOBAL = {T.TOKEN_EMBD: "model.embed_tokens", T.OUTPUT_NORM: "model.norm", T.OUTPUT: "lm_head"}
_LAYER = {  # inside model.layers.{bid}.
    T.ATTN_NORM: "input_layernorm", T.FFN_NORM: "post_attention_layernorm",
    T.ATTN_Q: "self_attn.q_proj", T.ATTN_K: "self_attn.k_proj", T.ATTN_V: "self_attn.v_proj",
    T.ATTN_OUT: "self_attn.o_proj", T.ATTN_Q_NORM: "self_attn.q_norm", T.ATTN_K_NORM: "self_attn.k_norm",
    # MLA: q_a/q_b (or one q_proj, V2-Lite), the joint KV down-projection with the rope key, its up-projection
    T.ATTN_Q_A: "self_attn.q_a_proj", T.ATTN_Q_A_NORM: "self_attn.q_a_layernorm", T.ATTN_Q_B: "self_attn.q_b_proj",
    T.ATTN_KV_A_MQA: "self_attn.kv_a_proj_with_mqa", T.ATTN_KV_A_NORM: "self_attn.kv_a_layernorm",
    T.ATTN_KV_B: "self_attn.kv_b_proj",  # legacy files; current ones split it into attn_k_b + attn_v_b
    T.FFN_GATE: "mlp.gate_proj", T.FFN_UP: "mlp.up_proj", T.FFN_DOWN: "mlp.down_proj",
    T.FFN_GATE_INP: "mlp.gate", T.FFN_EXP_PROBS_B: "mlp.gate.e_score_correction_bias",
    T.FFN_GATE_SHEXP: "mlp.shared_experts.gate_proj", T.FFN_UP_SHEXP: "mlp.shared_experts.up_proj",
    T.FFN_DOWN_SHEXP: "mlp.shared_experts.down_proj",
}
_EXPERTS = {T.FFN_GATE_EXP: "gate_proj", T.FFN_UP_EXP: "up_proj", T.FFN_DOWN_EXP: "down_proj"}  # stacked (E, ...)
_SKIP = (T.ROPE_FREQS, T.ATTN_ROT_EMBD)  # read into the config, or derived
_HF_LAYER = {hf: t for t, hf in _LAYER.items() if t != T.ATTN_KV_B}
_HF_LAYER["self_attn.kv_b_proj"] = T.ATTN_KV_B

# tokenizer.ggml.pre -> the regexes that split text before BPE, in order (llama.cpp's llama-vocab.cpp), written as
# tokenizer.json writes them. The first name of each list is what export writes.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel(use_regex=True)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")  # one digit per piece
_DEEPSEEK3 = (r"\p{N}{1,3}", "[一-龥\u3040-ゟ゠-ヿ]+",
              "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
              "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")
# DeepSeek-V2 (DeepSeek LLM's vocabulary): line breaks, cased letters of the alphabetic scripts, ASCII / full-width
# punctuation, trailing space, CJK runs, then single digits (its tokenizer.json has these five and Digits)
_DEEPSEEK_LLM = ("[\r\n]",
                 "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
                 "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
                 "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
                 "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
                 "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-"
                 "\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
                 "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
                 "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
                 "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
                 "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
                 "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
                 "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", "\\s+$",
                 "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}")
PRE_TOKENIZERS = {
    "smollm": (r"\p{N}", _GPT2), "starcoder": (r"\p{N}", _GPT2), "refact": (r"\p{N}", _GPT2),  # nanoseek's own
    "gpt-2": (_GPT2,),
    "llama-bpe": (_LLAMA3,), "llama3": (_LLAMA3,), "llama-v3": (_LLAMA3,),
    "qwen2": (_QWEN2,), "deepseek-r1-qwen": (_QWEN2,),
    "deepseek-v3": _DEEPSEEK3, "joyai-llm": _DEEPSEEK3, "hunyuan-dense": _DEEPSEEK3,  # same split, later names
    "deepseek-llm": _DEEPSEEK_LLM,   # llama.cpp ends it with \p{N}+; V2's vocabulary has no multi-digit token
}
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")  # llama.cpp: whole-word vocabulary hits skip the merges; add bos

_STORE = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_FILE_TYPE = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}


# ====================================================================== reading

def _open(path: str | os.PathLike) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    stat = path.stat()
    try:
        return _reader(str(path.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    except (ValueError, OSError, IndexError) as e:  # bad magic, unsupported version, truncated
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


@functools.lru_cache(maxsize=1)
def _reader(path: str, inode: int, mtime_ns: int, size: int) -> gguf.GGUFReader:
    """The last file opened, kept: parsing the metadata of a 150k-token vocabulary takes seconds, and a model and
    its tokenizer (load_model_and_tokenizer) read the same file one after the other. Keyed by the file's state."""
    return gguf.GGUFReader(path)


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(v: float) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-06, not 9.999999974752427e-07)."""
    return float(str(np.float32(v)))


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device=None) -> Transformer:
    """A GGUF file of the llama, qwen2, qwen3 or deepseek2 architecture -> our Transformer, dequantised tensor by
    tensor. dtype None: the file's own type when it is F32, F16 or BF16 (general.file_type), else bfloat16."""
    reader = _open(path)
    cfg = gguf_config(reader, path)
    return build_from_tensors(cfg, _hf_tensors(reader, cfg, path), source=str(path), dtype=dtype, device=device)


def gguf_config(reader: gguf.GGUFReader, path) -> ModelConfig:
    """GGUF metadata (and the tensors' shapes) -> the ModelConfig that config.json would give."""
    arch = _field(reader, "general.architecture")
    if arch not in set(ARCHS.values()):
        raise CheckpointError(f"{path}: general.architecture is {arch!r}; nanoseek reads GGUF files of the "
                              f"{', '.join(sorted(set(ARCHS.values())))} architectures")
    names = {t.name: t for t in reader.tensors}

    def key(k: str, default=None, required: bool = False):
        v = _field(reader, k.format(arch=arch), default)
        if v is None and required:
            raise CheckpointError(f"{path}: metadata key {k.format(arch=arch)} is missing (a {arch} file needs it)")
        return v

    K, A, R, Tk = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope, gguf.Keys.Tokenizer
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{path}: no token_embd.weight tensor (the embedding every {arch} model has)")
    d = {"vocab_size": int(names["token_embd.weight"].shape[1]),
         "hidden_size": key(K.EMBEDDING_LENGTH, required=True), "num_hidden_layers": key(K.BLOCK_COUNT, required=True),
         "num_attention_heads": key(A.HEAD_COUNT, required=True),
         "rms_norm_eps": _f32(key(A.LAYERNORM_RMS_EPS, 1e-6)), "rope_theta": _f32(key(R.FREQ_BASE, 10000.0)),
         "max_position_embeddings": key(K.CONTEXT_LENGTH, 4096), "tie_word_embeddings": "output.weight" not in names,
         "bos_token_id": key(Tk.BOS_ID), "eos_token_id": key(Tk.EOS_ID), "pad_token_id": key(Tk.PAD_ID),
         "torch_dtype": _file_dtype(reader)}
    d.update(_deepseek_config(key, names, d) if arch == "deepseek2" else _dense_config(arch, key, names, d, path))
    try:
        return ModelConfig.from_hf(d)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _file_dtype(reader: gguf.GGUFReader) -> str:
    """The model dtype a file implies: its own type (general.file_type, else its matrices' one type) when that is
    F32, F16 or BF16; bfloat16 for a quantised file (what such files are made from)."""
    F = gguf.LlamaFileType
    file_type = _field(reader, "general.file_type")
    if file_type is None:
        kinds = {t.tensor_type for t in reader.tensors if len(t.shape) > 1}
        file_type = {Q.F32: F.ALL_F32, Q.F16: F.MOSTLY_F16}.get(kinds.pop()) if len(kinds) == 1 else None
    return {F.ALL_F32: "float32", F.MOSTLY_F16: "float16"}.get(file_type, "bfloat16")


def _dense_config(arch: str, key, names: dict, d: dict, path) -> dict:
    """llama / qwen2 / qwen3 hyper-parameters (transformers' LlamaConfig / Qwen2Config / Qwen3Config names)."""
    K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    heads = d["num_attention_heads"]
    head_dim = key(A.KEY_LENGTH) or d["hidden_size"] // heads
    if key(R.DIMENSION_COUNT, head_dim) != head_dim:
        raise CheckpointError(f"{path}: rope.dimension_count={key(R.DIMENSION_COUNT)} but heads are {head_dim} "
                              f"wide: partial rotary embeddings are not supported for {arch}")
    out = {"model_type": arch, "num_key_value_heads": key(A.HEAD_COUNT_KV, heads), "head_dim": head_dim,
           "intermediate_size": key(K.FEED_FORWARD_LENGTH, required=True)}
    if arch != "qwen2":  # qwen2's q/k/v always carry a bias
        out["attention_bias"] = "blk.0.attn_q.bias" in names
    if "rope_freqs.weight" in names:  # llama3's scaling, as llama.cpp stores it
        factors = _dequantize(names["rope_freqs.weight"], path).double().numpy()
        out["rope_scaling"] = _llama3_scaling(factors, d["rope_theta"], head_dim, path)
    elif key(R.SCALING_TYPE) not in (None, "none"):
        original = key(R.SCALING_ORIG_CTX_LEN, d["max_position_embeddings"])
        out["rope_scaling"] = {"rope_type": key(R.SCALING_TYPE), "factor": _f32(key(R.SCALING_FACTOR, 1.0)),
                               "original_max_position_embeddings": original}
    return out


def _deepseek_config(key, names: dict, d: dict) -> dict:
    """deepseek2 (MLA + DeepSeekMoE) hyper-parameters, in transformers' DeepseekV3Config / V2Config names."""
    K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    rope = key(R.DIMENSION_COUNT, required=True)
    if key(A.KEY_LENGTH_MLA):  # current files: MLA written as MQA over the latent; head sizes in the _mla keys
        nope, v = key(A.KEY_LENGTH_MLA) - rope, key(A.VALUE_LENGTH_MLA, required=True)
    else:
        nope, v = key(A.KEY_LENGTH, required=True) - rope, key(A.VALUE_LENGTH, required=True)
    sigmoid = key(K.EXPERT_GATING_FUNC, gguf.ExpertGatingFuncType.SOFTMAX) == gguf.ExpertGatingFuncType.SIGMOID
    n_group = key(K.EXPERT_GROUP_COUNT, 1)
    if any(n.endswith(".exp_probs_b.bias") for n in names):
        method = "noaux_tc"                   # V3: a bias on the scores picks the experts
    else:
        method = "group_limited_greedy" if n_group > 1 else "greedy"
    out = {"model_type": "deepseek_v3" if sigmoid else "deepseek_v2", "num_key_value_heads": d["num_attention_heads"],
           "q_lora_rank": None if "blk.0.attn_q.weight" in names else key(A.Q_LORA_RANK, required=True),
           "kv_lora_rank": key(A.KV_LORA_RANK, required=True), "qk_nope_head_dim": nope, "qk_rope_head_dim": rope,
           "v_head_dim": v, "intermediate_size": key(K.FEED_FORWARD_LENGTH, required=True),
           "moe_intermediate_size": key(K.EXPERT_FEED_FORWARD_LENGTH, 0), "n_routed_experts": key(K.EXPERT_COUNT),
           "num_experts_per_tok": key(K.EXPERT_USED_COUNT), "n_shared_experts": key(K.EXPERT_SHARED_COUNT, 0),
           "first_k_dense_replace": key(K.LEADING_DENSE_BLOCK_COUNT, 0), "n_group": n_group,
           "topk_group": key(K.EXPERT_GROUP_USED_COUNT, 1), "topk_method": method,
           "routed_scaling_factor": _f32(key(K.EXPERT_WEIGHTS_SCALE, 1.0)),
           "norm_topk_prob": bool(key(K.EXPERT_WEIGHTS_NORM, False)),
           "scoring_func": "sigmoid" if sigmoid else "softmax",
           "rope_interleave": True, "num_nextn_predict_layers": 0, "rope_scaling": None}
    if key(R.SCALING_TYPE) == "yarn":
        yarn = {"type": "yarn", "factor": _f32(key(R.SCALING_FACTOR, 1.0)),
                "original_max_position_embeddings": key(R.SCALING_ORIG_CTX_LEN, d["max_position_embeddings"]),
                "beta_fast": _f32(key(R.SCALING_YARN_BETA_FAST, 32.0)),
                "beta_slow": _f32(key(R.SCALING_YARN_BETA_SLOW, 1.0))}
        if key(R.SCALING_YARN_LOG_MUL) is not None:  # 0.1 * mscale_all_dim (llama.cpp assumes mscale = mscale_all_dim)
            yarn["mscale"] = yarn["mscale_all_dim"] = _f32(_f32(key(R.SCALING_YARN_LOG_MUL)) / 0.1)
        out["rope_scaling"] = yarn
    return out


def _llama3_frequency_divisors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """What llama3 rope scaling divides each pair's frequency by (transformers' _compute_llama3_parameters):
    1 for wavelengths under original/high_freq_factor, `factor` over original/low_freq_factor, a blend between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, path) -> dict | None:
    """rope_freqs (the per-pair divisors llama.cpp applies) -> transformers' llama3 rope_scaling.

    Between the two plateaus the blend is 1/f = (1 - s)/factor + s with s = (original / wavelen - low) / (high -
    low), a straight line in 1 / wavelen: its slope and intercept are what the divisors determine, so low_freq_factor
    is taken as 1 (as every Llama 3 has) and the other two follow. The result is checked against the divisors."""
    factor = float(factors.max())
    if factor <= 1 + 1e-6:
        return None
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    blend = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    s = (1 / factors - 1 / factor) / (1 - 1 / factor)
    if blend.sum() >= 2:
        slope, intercept = np.polyfit(1 / wavelen[blend], s[blend], 1)     # s = slope / wavelen + intercept
        high, original = 1 - 1 / intercept, -slope / intercept
    elif blend.sum() == 1:
        high = 4.0
        original = float(wavelen[blend][0] * (1 + (high - 1) * s[blend][0]))
    else:  # plateaus only: any boundary between the last unscaled and the first scaled wavelength
        original = float(wavelen[factors >= factor * (1 - 1e-4)].min())
        short = wavelen[factors <= 1 + 1e-4]
        high = (1 + original / short.max()) / 2 if short.size else 2.0
    scaling = {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": 1.0, "high_freq_factor": _f32(high),
               "original_max_position_embeddings": int(round(original))}
    if not np.allclose(_llama3_frequency_divisors(scaling, theta, head_dim), factors, rtol=1e-4):
        raise CheckpointError(f"{path}: rope_freqs.weight does not follow llama3 rope scaling; nanoseek cannot "
                              f"express these per-frequency factors")
    return scaling


def _dequantize(t, path) -> torch.Tensor:
    """One GGUF tensor -> torch, in its logical shape (GGUF lists dimensions innermost first)."""
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    if t.tensor_type == Q.F32:
        out = torch.from_numpy(np.array(t.data, dtype=np.float32))
    elif t.tensor_type == Q.F16:
        out = torch.from_numpy(np.array(t.data, dtype=np.float16))
    elif t.tensor_type == Q.BF16:  # raw bytes, two per value: reinterpret, no rounding
        out = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16)
    else:
        try:
            out = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf "
                                  f"library cannot dequantise (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, Q2_K-Q6_K and "
                                  f"the IQ types can be read)") from None
    return out.reshape(shape)


def _half_to_adjacent(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of each head from half-split RoPE pairs (x_0..x_{d/2-1}, y_0..) to adjacent ones
    (x_0, y_0, x_1, y_1, ...): what llama.cpp's converter does to llama's q and k (and we to a half-split MLA)."""
    return w.reshape(n_heads, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _adjacent_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of _half_to_adjacent (as transformers' GGUF loader undoes llama's permutation)."""
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_tensors(reader: gguf.GGUFReader, cfg: ModelConfig, path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the file as (transformers' name, tensor), dequantised one at a time."""
    arch = ARCHS[cfg.model_type]
    kinds = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]])
    names = {gguf.TENSOR_NAMES[k].format(bid=i): (k, i) for k in kinds for i in range(cfg.num_hidden_layers)}
    split_kv: dict[int, dict] = {}  # layer -> {ATTN_K_B: ..., ATTN_V_B: ...} until both have come
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        kind, bid = names.get(base, (None, None))
        if kind in _SKIP:
            continue
        if kind is None or not (kind in _GLOBAL or kind in _LAYER or kind in _EXPERTS or kind in (T.ATTN_K_B,
                                                                                               T.ATTN_V_B)):
            raise CheckpointError(f"{path}: tensor {t.name} is not part of a {arch} model as nanoseek reads it "
                                  f"({cfg.num_hidden_layers} layers)")
        w = _dequantize(t, path)
        if kind in _GLOBAL:
            yield f"{_GLOBAL[kind]}.{suffix}", w
        elif kind in _EXPERTS:
            for e in range(w.shape[0]):
                yield f"model.layers.{bid}.mlp.experts.{e}.{_EXPERTS[kind]}.{suffix}", w[e]
        elif kind in (T.ATTN_K_B, T.ATTN_V_B):
            split_kv.setdefault(bid, {})[kind] = w
            if len(split_kv[bid]) == 2:
                parts = split_kv.pop(bid)
                yield f"model.layers.{bid}.self_attn.kv_b_proj.weight", _join_kv_b(parts[T.ATTN_K_B], parts[T.ATTN_V_B])
        elif kind == T.FFN_EXP_PROBS_B:
            yield f"model.layers.{bid}.{_LAYER[kind]}", w.float()
        elif arch == "llama" and kind in (T.ATTN_Q, T.ATTN_K):
            heads = cfg.num_attention_heads if kind == T.ATTN_Q else cfg.num_key_value_heads
            yield f"model.layers.{bid}.{_LAYER[kind]}.{suffix}", _adjacent_to_half(w, heads)
        else:
            yield f"model.layers.{bid}.{_LAYER[kind]}.{suffix}", w
    if split_kv:
        raise CheckpointError(f"{path}: layer {min(split_kv)} has only one of attn_k_b / attn_v_b (kv_b_proj needs "
                              f"both)")


def _join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """attn_k_b (H, kv_lora_rank, nope) and attn_v_b (H, v, kv_lora_rank) -> kv_b_proj (H * (nope + v), rank)."""
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1])


def _split_kv_b(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj (H * (nope + v), rank) -> llama.cpp's attn_k_b (H, rank, nope) and attn_v_b (H, v, rank)."""
    kv = w.reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
    k, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
    return k.transpose(1, 2).contiguous(), v.contiguous()


# ====================================================================== tokenizer

def tokenizer_files(path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Write the GGUF file's tokenizer as tokenizer.json + tokenizer_config.json into `folder` (what
    Tokenizer.load reads): byte-level BPE with the file's vocabulary, merges, pre-tokenizer, control and
    user-defined tokens, bos/eos/pad and chat template."""
    reader = _open(path)
    data, config = _tokenizer_json(reader, path)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    return folder


def _tokenizer_json(reader: gguf.GGUFReader, path) -> tuple[dict, dict]:
    """The GGUF vocabulary -> (tokenizer.json, tokenizer_config.json) as dicts."""
    Tk = gguf.Keys.Tokenizer
    model = _field(reader, Tk.MODEL)
    if model != "gpt2":
        raise UsageError(f"{path}: its tokenizer is {model!r} (tokenizer.ggml.model); nanoseek reads byte-level BPE "
                         f"vocabularies ('gpt2': Llama 3, Qwen2/3, DeepSeek V3)")
    pre = _field(reader, Tk.PRE, "default")
    if pre not in PRE_TOKENIZERS:
        raise UsageError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not one nanoseek knows "
                         f"({', '.join(PRE_TOKENIZERS)}); load the tokenizer from the model's Hugging Face folder")
    tokens = _field(reader, Tk.LIST)
    types = _field(reader, Tk.TOKEN_TYPE) or [gguf.TokenType.NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty == gguf.TokenType.CONTROL}
             for i, (tok, ty) in enumerate(zip(tokens, types))
             if ty in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    # "a b": the pair splits at the first space after the first character (llama.cpp's rule)
    merges = [[m[:i], m[i + 1:]] for m in _field(reader, Tk.MERGES, []) for i in [m.find(" ", 1)]]

    def token(key: str) -> str | None:
        i = _field(reader, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token(Tk.BOS_ID)
    add_bos = bool(_field(reader, Tk.ADD_BOS, pre in _LLAMA3_PRE)) and bos is not None
    split = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
             for r in PRE_TOKENIZERS[pre]]
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": split + [
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": _bos_processor(bos, vocab[bos]) if add_bos else None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": pre in _LLAMA3_PRE, "vocab": vocab, "merges": merges}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": token(Tk.EOS_ID),
              "pad_token": token(Tk.PAD_ID), "add_bos_token": add_bos,
              "add_eos_token": bool(_field(reader, Tk.ADD_EOS, False)), "clean_up_tokenization_spaces": False,
              "chat_template": _field(reader, Tk.CHAT_TEMPLATE)}
    return data, {k: v for k, v in config.items() if v is not None}


def _bos_processor(bos: str, bos_id: int) -> dict:
    """tokenizer.json's TemplateProcessing that puts bos first, as Tokenizer's own post-processor does."""
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _pre_name(pre: dict | None) -> str | None:
    """tokenizer.json's pre_tokenizer -> the tokenizer.ggml.pre name whose regexes split text the same way."""
    regexes: list[str] = []
    for p in (pre or {}).get("pretokenizers", [pre] if pre else []):
        if p["type"] == "Split" and "Regex" in p["pattern"] and p["behavior"] == "Isolated" and not p["invert"]:
            regexes.append(p["pattern"]["Regex"])
        elif p["type"] == "Digits":
            regexes.append(r"\p{N}" if p.get("individual_digits") else r"\p{N}+")
        elif p["type"] == "ByteLevel":
            regexes += [_GPT2] if p.get("use_regex", True) else []
        else:
            return None
    same = lambda a, b: [r.replace("\\r", "\r").replace("\\n", "\n") for r in a] == [  # noqa: E731
        r.replace("\\r", "\r").replace("\\n", "\n") for r in b]
    return next((name for name, want in PRE_TOKENIZERS.items() if same(regexes, want)), None)


def _tokenizer_keys(w: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """A saved tokenizer folder (tokenizer.json, tokenizer_config.json) -> the tokenizer.* keys, as llama.cpp's
    converter writes them: one token per id up to the model's vocab_size ([PADn] for ids no token has), added
    tokens CONTROL when special (or spelled <|...|> / <｜...｜>), else USER_DEFINED."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise UsageError("GGUF export needs a byte-level BPE tokenizer (as nanoseek trains, and Llama 3, Qwen2 and "
                         f"DeepSeek publish); this one is {model.get('type')} with a "
                         f"{(data.get('decoder') or {}).get('type')} decoder")
    normalizer = data.get("normalizer") or {}
    if normalizer and normalizer.get("normalizers", True):  # None and an empty Sequence change nothing
        warnings.warn(f"the tokenizer's {normalizer.get('type')} normalizer has no place in a GGUF file: llama.cpp "
                      f"tokenizes without it, so text it would change (e.g. decomposed accents, for NFC) may get "
                      f"other ids there", stacklevel=3)
    pre = _pre_name(data.get("pre_tokenizer"))
    if pre is None:
        warnings.warn("this tokenizer splits text in a way llama.cpp has no name for: the GGUF says 'default', and "
                      "llama.cpp may then tokenize some text differently from nanoseek", stacklevel=3)
        pre = "default"
    vocab = {i: tok for tok, i in model["vocab"].items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    n = max([vocab_size, *(i + 1 for i in vocab), *(i + 1 for i in added)])
    if n > vocab_size:
        raise UsageError(f"the tokenizer has ids up to {n - 1} but the model's vocab_size is {vocab_size}: llama.cpp "
                         f"needs one embedding row per token (use the tokenizer the model was trained with)")
    tokens, types = [], []
    for i in range(n):
        if i in added:
            tok = added[i]["content"]
            looks = re.fullmatch(r"<\|.*\|>|<｜.*｜>", tok) is not None
            types.append(gguf.TokenType.CONTROL if added[i]["special"] or looks else gguf.TokenType.USER_DEFINED)
        elif i in vocab:
            tok = vocab[i]
            types.append(gguf.TokenType.NORMAL)
        else:
            tok = f"[PAD{i}]"
            types.append(gguf.TokenType.UNUSED)
        tokens.append(tok)
    ids = {tok: i for i, tok in reversed(list(enumerate(tokens)))}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for name, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                      ("pad_token", w.add_pad_token_id)):
        tok = config.get(name)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in ids:
            add(ids[tok])
    w.add_add_bos_token(bool(config.get("add_bos_token", False)))
    w.add_add_eos_token(bool(config.get("add_eos_token", False)))
    jinja = folder / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
    if isinstance(template, str):
        w.add_chat_template(template)


# ====================================================================== writing

def export_gguf(model: Transformer, tokenizer, path: str | os.PathLike, type: str = "f16",
                progress: bool = False) -> Path:
    """Write `model` and `tokenizer` as one GGUF file that llama.cpp runs: DeepSeek models as its deepseek2
    architecture, the dense families as llama / qwen2 / qwen3. type: the matrices' storage, f16 | bf16 | q8_0 |
    f32 (norms, biases, the router and rope_freqs stay F32; a matrix whose rows do not fill Q8_0's 32-value blocks
    falls back to F16). The file appears whole or not at all (written beside, then renamed)."""
    if type not in _STORE:
        raise UsageError(f"GGUF type {type!r} is not supported: expected one of {', '.join(_STORE)}")
    cfg, want, path = model.cfg, _STORE[type], Path(path)
    _check_exportable(cfg)
    hf = cfg.to_hf()
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, ARCHS[cfg.model_type])
    w.add_name(path.stem)
    w.add_file_type(_FILE_TYPE[want])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _model_keys(w, cfg, hf)
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        _tokenizer_keys(w, Path(d), cfg.vocab_size)
    for name, t in _gguf_tensors(model):                 # pass 1: names, shapes and sizes (the header)
        q = _storage(name, t, want)
        shape = gguf.quant_shape_to_byte_shape(t.shape, q) if q not in (Q.F32, Q.F16) else tuple(t.shape)
        dt = {Q.F32: np.float32, Q.F16: np.float16}.get(q, np.uint8)
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize,
                          raw_dtype=None if dt is not np.uint8 else q)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        tensors = _gguf_tensors(model)
        if progress:
            from tqdm import tqdm
            tensors = tqdm(tensors, total=len(w.tensors[0]), desc=f"export-gguf ({type})", unit="tensor")
        for name, t in tensors:                          # pass 2: the data, one tensor at a time
            w.write_tensor_data(_encode(t, _storage(name, t, want)))
        w.close()
        os.replace(tmp, path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return path


def _check_exportable(cfg: ModelConfig) -> None:
    """What llama.cpp's architectures cannot express, refused before anything is written."""
    if cfg.model_type not in ARCHS:
        raise UsageError(f"model_type {cfg.model_type!r} has no GGUF export here (we write "
                         f"{', '.join(sorted(ARCHS))}); DeepSeek-V3.2's lightning indexers have no deepseek2 tensors")
    if cfg.attention == "gqa":
        return
    if cfg.attention_bias:
        raise UsageError("this DeepSeek model has attention biases (attention_bias=true); llama.cpp's deepseek2 "
                         "has none, so it cannot run it")
    if cfg.is_moe and cfg.moe_layer_freq != 1:
        raise UsageError(f"moe_layer_freq={cfg.moe_layer_freq}: llama.cpp's deepseek2 makes every layer after the "
                         f"first_k_dense_replace dense ones an MoE layer (moe_layer_freq=1)")
    yarn = cfg.rope_scaling or {}
    if yarn and (yarn.get("mscale") or 0) != (yarn.get("mscale_all_dim") or 0):
        raise UsageError(f"YaRN with mscale={yarn.get('mscale')} != mscale_all_dim={yarn.get('mscale_all_dim')}: "
                         f"llama.cpp's deepseek2 stores one (yarn_log_multiplier) and assumes both equal")
    if cfg.topk_method == "group_limited_greedy" and (cfg.n_group or 1) > 1:
        warnings.warn("llama.cpp scores an expert group by the sum of its two best experts (V3's noaux_tc rule), not "
                      "by its best one (V2's group_limited_greedy): in llama.cpp this model may route some tokens "
                      "to other experts (llama.cpp's own converter writes V2 the same way)", stacklevel=3)
    if cfg.num_nextn_predict_layers:
        warnings.warn(f"the {cfg.num_nextn_predict_layers} MTP layer(s) are not exported: llama.cpp's deepseek2 does "
                      f"not run them (its own converter drops them too)", stacklevel=3)
    lite = cfg.num_hidden_layers in (26, 27)
    if lite != (cfg.q_lora_rank is None):
        warnings.warn(f"llama.cpp decides whether a deepseek2 model has q_lora_rank from its layer count (26 or 27 "
                      f"layers: none, like V2-Lite); this one has {cfg.num_hidden_layers} layers and "
                      f"q_lora_rank={cfg.q_lora_rank}, so llama.cpp will refuse the file (nanoseek reads it)",
                      stacklevel=3)


def _model_keys(w: gguf.GGUFWriter, cfg: ModelConfig, hf: dict) -> None:
    """The {arch}.* keys llama.cpp reads for this family (as convert_hf_to_gguf.py writes them)."""
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rs = cfg.rope_scaling or {}
    rtype = rs.get("type", rs.get("rope_type"))
    if cfg.attention == "gqa":
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        if rtype == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rs["factor"])
            w.add_rope_scaling_orig_ctx_len(rs.get("original_max_position_embeddings", cfg.max_position_embeddings))
        return  # llama3's scaling goes in the rope_freqs tensor
    _deepseek_keys(w, cfg, rs if rtype == "yarn" else None)


def _deepseek_keys(w: gguf.GGUFWriter, cfg: ModelConfig, yarn: dict | None) -> None:
    """MLA written as llama.cpp runs it: multi-query attention over the latent (one K/V head of kv_lora_rank +
    qk_rope_head_dim), with the per-head sizes in the _mla keys; DeepSeekMoE's counts, scale and gating."""
    w.add_head_count_kv(1)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace if cfg.is_moe else cfg.num_hidden_layers)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts or 0)
    if cfg.is_moe:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_expert_group_count(cfg.n_group or 1)
        w.add_expert_group_used_count(cfg.topk_group or 1)
    if yarn:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(yarn["factor"])
        w.add_rope_scaling_orig_ctx_len(yarn.get("original_max_position_embeddings", 4096))
        w.add_rope_scaling_yarn_beta_fast(yarn.get("beta_fast") or 32.0)
        w.add_rope_scaling_yarn_beta_slow(yarn.get("beta_slow") or 1.0)
        if yarn.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * yarn["mscale_all_dim"])


def _tname(kind, bid: int | None = None, suffix: str = "weight") -> str:
    """llama.cpp's name of one tensor: blk.{bid}.attn_q.weight, token_embd.weight, ..."""
    return f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.{suffix}"


def _gguf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under llama.cpp's names and layouts (see the module docstring), float32."""
    cfg = model.cfg
    arch = ARCHS[cfg.model_type]
    experts: dict[tuple[int, str], list[torch.Tensor]] = {}
    glob = {hf: kind for kind, hf in _GLOBAL.items()}
    for name, t in ours_to_hf(model):
        t = t.detach().float().cpu()
        m = re.match(r"^model\.layers\.(\d+)\.(.+?)(?:\.(weight|bias))?$", name)
        if m is None:
            yield _tname(glob[name.rsplit(".", 1)[0]]), t
            continue
        bid, rest, suffix = int(m.group(1)), m.group(2), m.group(3) or "bias"  # e_score_correction_bias: a bias
        if bid >= cfg.num_hidden_layers:
            continue  # MTP
        e = re.match(r"^mlp\.experts\.(\d+)\.(\w+)$", rest)
        if e:  # stacked per projection once all of the layer's experts have come
            stack = experts.setdefault((bid, e.group(2)), [])
            stack.append(t)
            if len(stack) == cfg.n_routed_experts:
                kind = next(k for k, v in _EXPERTS.items() if v == e.group(2))
                yield _tname(kind, bid), torch.stack(experts.pop((bid, e.group(2))))
            continue
        kind = _HF_LAYER[rest]
        if kind == T.ATTN_KV_B:
            k_b, v_b = _split_kv_b(t, cfg)
            yield _tname(T.ATTN_K_B, bid), k_b
            yield _tname(T.ATTN_V_B, bid), v_b
            continue
        if arch == "llama" and kind in (T.ATTN_Q, T.ATTN_K):
            t = _half_to_adjacent(t, cfg.num_attention_heads if kind == T.ATTN_Q else cfg.num_key_value_heads)
        elif arch == "deepseek2" and not cfg.rope_interleave and kind in (T.ATTN_Q, T.ATTN_Q_B, T.ATTN_KV_A_MQA):
            t = _interleave_rope_rows(t, cfg, kind)
        yield _tname(kind, bid, suffix), t
    rs = cfg.rope_scaling or {}
    if rs.get("type", rs.get("rope_type")) == "llama3":
        divisors = _llama3_frequency_divisors(rs, cfg.rope_theta, cfg.head_dim)
        yield _tname(T.ROPE_FREQS), torch.from_numpy(divisors).float()


def _interleave_rope_rows(t: torch.Tensor, cfg: ModelConfig, kind) -> torch.Tensor:
    """A half-split MLA's RoPE rows in llama.cpp's adjacent-pair order: the last qk_rope_head_dim rows of each
    query head (q_b_proj / q_proj), the last qk_rope_head_dim rows of kv_a_proj_with_mqa (the shared k_pe)."""
    rope = cfg.qk_rope_head_dim
    if kind == T.ATTN_KV_A_MQA:
        return torch.cat([t[:-rope], _half_to_adjacent(t[-rope:], 1)])
    heads = t.reshape(cfg.num_attention_heads, cfg.qk_head_dim, -1)
    pe = _half_to_adjacent(heads[:, -rope:].reshape(-1, t.shape[-1]), cfg.num_attention_heads)
    return torch.cat([heads[:, :-rope], pe.reshape(cfg.num_attention_heads, rope, -1)], dim=1).reshape(t.shape)


def _storage(name: str, t: torch.Tensor, want) -> Q:
    """The type one tensor is stored in: F32 for vectors, the router and rope_freqs (as llama.cpp's converter
    keeps them), F16 where the rows do not fill whole quantisation blocks, else the requested type."""
    if t.dim() == 1 or ".ffn_gate_inp." in name or name.startswith("rope_freqs"):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[want][0]
    return Q.F16 if t.shape[-1] % block else want


def _encode(t: torch.Tensor, q) -> np.ndarray:
    a = t.numpy()
    if q == Q.F32:
        return np.ascontiguousarray(a, dtype=np.float32)
    if q == Q.F16:
        return np.ascontiguousarray(a, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), q)
