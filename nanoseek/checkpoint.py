"""load() / save() of Hugging Face model folders: config.json + safetensors (single file or sharded), and GGUF.

Reads DeepSeek-V2/V3/V3.1/V4 folders as published (bf16, or FP8 e4m3 with 128x128 blocks of scales, which are
dequantised on load: float32 scales as V3 publishes them, or V3.1's and V4's UE8M0 powers of two; V4's routed experts
in FP4 e2m1 with a UE8M0 scale per 32 inputs, nanoseek/fp4.py), the dense families R1 was distilled into (qwen2,
llama, qwen3) as published, and all of them as transformers saves them; writes folders that transformers loads
unchanged, with each family's own config keys and tensor names. Only safetensors are ever read: pickled weights
(.bin/.pt) are refused, never unpickled. A path ending in .gguf goes to nanoseek.gguf.

Loading streams: the model is built on the meta device, allocated once, and each tensor is read from its file
and copied into place (model/weights.py: build_from_tensors), so peak memory is the model plus one tensor: an 8B
student in bf16 takes 16 GB. A quantised tensor is dequantised as it is read (its float32 copy is the one extra).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import UsageError
from .fp4 import FP4_BLOCK, PACKED_DTYPES, dequantize_fp4
from .model.transformer import Transformer
from .model.weights import DTYPES, CheckpointError, build_from_tensors, hf_to_ours, ours_to_hf, resolve_dtype

# the model-building half lives in model/weights.py (gguf.py uses it too); these names are public here as well
__all__ = ["CheckpointError", "build_from_tensors", "hf_to_ours", "ours_to_hf", "read_config", "load", "save",
           "load_model_and_tokenizer"]

_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle(path: Path, where: Path):
    raise CheckpointError(f"{where}: weights in {path.name} are not safetensors; nanoseek never reads pickled weights "
                          f"(.bin/.pt: loading them can run arbitrary code). Convert them to safetensors first.")


def _keys(f: Path) -> list[str]:
    """Tensor names in one safetensors file (header only), with a clear error for a file that is not one."""
    try:
        with safe_open(f, "pt") as sf:
            return list(sf.keys())
    except Exception as e:  # SafetensorError, OSError: say which file, not a Rust backtrace
        raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None


def _weight_files(folder: Path) -> dict[str, Path]:
    """name -> file, from the index when sharded."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid index (expected a JSON object with a weight_map: {e})") from None
        out = {name: folder / f for name, f in weight_map.items()}
        for f in set(out.values()):
            if not f.name.endswith(".safetensors"):
                _refuse_pickle(f, index)
        return out
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p for p in folder.iterdir() if p.suffix in _PICKLED)
        if pickled:
            _refuse_pickle(pickled[0], folder)
        raise CheckpointError(f"{folder}: no *.safetensors weight file found")
    out = {}
    for f in files:
        for name in _keys(f):
            out[name] = f
    return out


def read_config(folder: str | os.PathLike) -> ModelConfig:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        d = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_hf(d)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


@dataclass(frozen=True)
class FP8Format:
    """How a folder's quantised weights are stored (config.json's quantization_config, as transformers'
    FineGrainedFP8Config reads it): e4m3 weights, one scale per (block[0] x block[1]) tile, and the scales' format.
    scale_fmt "float": any float32 value (DeepSeek-V3/R1). "ue8m0": powers of two only (DeepSeek-V3.1 on;
    the scale is an 8-bit exponent, 2^(e - 127), so dequantising is exact), stored as float32 values (as V3.1
    publishes), as torch.float8_e8m0fnu (as V4 publishes), or as the raw exponent bytes (uint8, as MXFP8
    checkpoints store them). DeepSeek-V4's routed experts are packed FP4 e2m1 (nanoseek/fp4.py) under the same
    quantization_config: the tensor's dtype tells them apart (int8 bytes, not float8_e4m3fn), as transformers'
    dequantiser does. expert_dtype ("fp8" or "fp4"; in quantization_config, or at the top level as DeepSeek's
    inference config has it) is checked but not needed: a published V4-Pro config.json has none."""
    block: tuple[int, int] = (128, 128)
    scale_fmt: str = "float"

    @classmethod
    def of(cls, qc: dict | None, where: Path) -> FP8Format:
        qc = qc or {}
        method, fmt = qc.get("quant_method", "fp8"), qc.get("fmt", "e4m3")
        scale_fmt = qc.get("scale_fmt") or "float"
        if method != "fp8" or fmt != "e4m3":
            raise CheckpointError(f"{where}: quantization_config has quant_method={method!r}, fmt={fmt!r}; nanoseek "
                                  f"reads FP8 block quantisation as DeepSeek publishes it (quant_method 'fp8', fmt "
                                  f"'e4m3'): dequantise the weights to bf16 first")
        if scale_fmt not in ("float", "ue8m0"):
            raise CheckpointError(f"{where}: quantization_config has scale_fmt={scale_fmt!r}; expected 'float' "
                                  f"(float32 block scales, DeepSeek-V3) or 'ue8m0' (powers of two, DeepSeek-V3.1)")
        block = tuple(qc.get("weight_block_size") or (128, 128))
        if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
            raise CheckpointError(f"{where}: quantization_config has weight_block_size={list(block)}; expected two "
                                  f"positive integers such as [128, 128]")
        expert_dtype = qc.get("expert_dtype") or "fp8"
        if expert_dtype not in ("fp8", "fp4"):
            raise CheckpointError(f"{where}: expert_dtype={expert_dtype!r} is not a format nanoseek reads; expected "
                                  f"'fp8' (experts quantised like the other weights) or 'fp4' (packed e2m1 experts, "
                                  f"DeepSeek-V4)")
        return cls(block, scale_fmt)


def _scales_as_float(scale_inv: torch.Tensor, fp8: FP8Format, sname: str, f: Path) -> torch.Tensor:
    """A tensor of block scales -> float32 values, checked against the declared scale format."""
    if scale_inv.dtype == torch.uint8:   # UE8M0 exponent bytes: 2^(byte - 127), exact in float32 (subnormals too)
        s = torch.ldexp(torch.ones(scale_inv.shape), scale_inv.to(torch.int32) - 127)
        s[scale_inv == 255] = float("nan")   # (0xFF is UE8M0's NaN)
    else:
        s = scale_inv.float()              # float8_e8m0fnu converts exactly (0xFF to NaN)
    if fp8.scale_fmt != "ue8m0":
        return s
    bad = torch.frexp(s).mantissa != 0.5   # a power of two is 0.5 x 2^k (zero, negatives, inf and NaN are not)
    if bad.any():
        i, j = (int(x) for x in bad.nonzero()[0])
        raise CheckpointError(f"{f}: {sname} holds {s[i, j].item()!r} for block ({i}, {j}), which is not a power of "
                              f"two, but config.json's quantization_config says scale_fmt='ue8m0' (UE8M0 scales are "
                              f"2^e). If the folder's scales are plain float32 scales, its scale_fmt should be "
                              f"'float' (or absent), as in DeepSeek-V3's config.json")
    return s


def _dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 e4m3 weight with one float32 scale per (block x block) tile -> float32 weight = tile * scale_inv."""
    out_f, in_f = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:out_f].repeat_interleave(block[1], 1)[:, :in_f]
    return w.float() * s


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device=None) -> Transformer:
    """Load a Hugging Face folder (ours, transformers', or as published: DeepSeek-V2/V3 in bf16 or FP8, qwen2,
    llama, qwen3) or a .gguf file. dtype: torch.bfloat16 or "bfloat16" etc.; None keeps the checkpoint's."""
    if str(path).endswith(".gguf"):
        from .gguf import load_gguf

        return load_gguf(path, dtype, device)
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a Hugging Face model folder with config.json, or "
                              f"a .gguf file)")
    cfg = read_config(folder)
    dtype = resolve_dtype(dtype, cfg)
    files = _weight_files(folder)
    L = cfg.num_hidden_layers
    has_mtp = any(re.match(rf"^(model\.layers\.{L + k}|mtp\.{k})\.", n)        # V4 publishes mtp.K.*
                  for n in files for k in range(cfg.num_nextn_predict_layers))
    if cfg.num_nextn_predict_layers and not has_mtp:
        warnings.warn(f"{folder}: config.json declares {cfg.num_nextn_predict_layers} MTP layer(s) but the weights "
                      f"hold none (transformers drops them on save); loading without MTP", stacklevel=2)
        cfg.num_nextn_predict_layers = 0
    fp8 = _quant_format(cfg, folder / "config.json")
    cfg.quantization_config = None  # dequantised on load: what we hold, and save, is plain weights
    searched = ", ".join(sorted({f.name for f in files.values()}))

    def where(name: str) -> str:
        return str(files[name]) if name in files else f"{folder} (weight files: {searched})"

    return build_from_tensors(cfg, _stream(files, fp8), where, dtype, device)


def _quant_format(cfg: ModelConfig, where: Path) -> FP8Format:
    """The folder's FP8Format, from quantization_config and a top-level expert_dtype (which transformers moves into
    quantization_config, as V4.1 ships it); both are dropped from cfg: the loaded model holds plain weights."""
    expert_dtype = cfg.extra.pop("expert_dtype", None)
    if not cfg.quantization_config:
        return FP8Format()
    qc = cfg.quantization_config
    return FP8Format.of({**qc, "expert_dtype": qc.get("expert_dtype") or expert_dtype}, where)


def _scale_name(name: str, files: dict[str, Path]) -> str | None:
    """The block scales of weight `name` in this folder: `X.weight_scale_inv` (DeepSeek-V3, transformers) or
    `X.scale` (DeepSeek-V4), or None."""
    if not name.endswith(".weight"):
        return None
    base = name.removesuffix(".weight")
    return next((s for s in (f"{base}.weight_scale_inv", f"{base}.scale") if s in files), None)


def _stream(files: dict[str, Path], fp8: FP8Format) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight, read one at a time, file by file; FP8 and FP4 dequantised, block scales
    consumed."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, f in files.items():
        by_file[f].append(name)
    scales = {_scale_name(n, files) for n in files} - {None} | {n for n in files if n.endswith(".weight_scale_inv")}
    for f, names in by_file.items():
        if not f.exists():
            raise CheckpointError(f"{f}: listed in model.safetensors.index.json but missing")
        _keys(f)  # a clear error for a corrupt or non-safetensors file
        with safe_open(f, "pt", device="cpu") as sf:
            for name in names:
                if name not in scales:
                    yield name, _read_tensor(sf, name, f, files, fp8)


def _read_tensor(sf, name: str, f: Path, files: dict[str, Path], fp8: FP8Format) -> torch.Tensor:
    """One tensor of the open safetensors file `sf`: FP8 e4m3 dequantised with its block scales, FP4 e2m1 (packed
    in bytes) with its per-32 scales; the scales may sit in another shard."""
    t = sf.get_tensor(name)
    sname = _scale_name(name, files)
    packed = t.dtype in PACKED_DTYPES and name.endswith(".weight")
    if t.dtype != torch.float8_e4m3fn and not packed:
        if sname is not None:
            raise CheckpointError(f"{f}: {name} is stored as {t.dtype} but has block scales {sname}; expected an "
                                  f"FP8 e4m3 weight (or packed FP4 bytes) next to its scales")
        return t
    kind = "FP8" if t.dtype == torch.float8_e4m3fn else "FP4"
    if sname is None:
        raise CheckpointError(f"{f}: {kind} tensor {name} ({t.dtype}) has no block scales (neither "
                              f"{name.removesuffix('.weight')}.scale nor .weight_scale_inv): they are needed to "
                              f"dequantise it")
    if files[sname] == f:                                     # usually: the scales sit next to their weight
        scale = sf.get_tensor(sname)
    else:
        with safe_open(files[sname], "pt", device="cpu") as ssf:
            scale = ssf.get_tensor(sname)
    if packed:
        return _read_fp4(t, scale, name, sname, (f, files[sname]), fp8)
    block = fp8.block
    want = tuple(-(-n // b) for n, b in zip(t.shape, block))  # ceil(out/128), ceil(in/128)
    if t.dim() != 2 or tuple(scale.shape) != want:
        raise CheckpointError(f"{files[sname]}: {sname} has shape {tuple(scale.shape)}, expected "
                              f"{want} for {name} {tuple(t.shape)} in {block[0]}x{block[1]} blocks")
    return _dequantize_fp8(t, _scales_as_float(scale, fp8, sname, files[sname]), block)


def _read_fp4(packed: torch.Tensor, scale: torch.Tensor, name: str, sname: str, paths: tuple[Path, Path],
              fp8: FP8Format) -> torch.Tensor:
    """A packed e2m1 weight (out, in/2) dequantised with its scales (out, in/32), shapes checked; paths: the files
    holding the weight and the scales."""
    f, sf = paths
    if packed.dim() != 2:
        raise CheckpointError(f"{f}: FP4 weight {name} has shape {tuple(packed.shape)}; expected a matrix (out, "
                              f"in/2) of bytes, two e2m1 values per byte")
    out, width = packed.shape
    want = (out, -(-2 * width // FP4_BLOCK))
    if tuple(scale.shape) != want:
        raise CheckpointError(f"{sf}: {sname} has shape {tuple(scale.shape)}, expected {want}: one scale per "
                              f"row and per {FP4_BLOCK} inputs of the FP4 weight {name} (packed {(out, width)}, "
                              f"{2 * width} inputs)")
    return dequantize_fp4(packed, _scales_as_float(scale, fp8, sname, sf))


def _without_remote_code(d: dict, folder: Path) -> dict:
    """config.json without an `auto_map` whose code is not in `folder`. A published config names its own modeling
    files ("configuration_deepseek.DeepseekV3Config") or another repository's ("org/repo--module.Class"); written
    into a folder without those files, transformers (trust_remote_code=True) fails with OSError and llama.cpp's
    converter crashes. The classes it names are transformers' own, which `architectures` points at anyway."""
    refs = [r for v in (d.get("auto_map") or {}).values() for r in (v if isinstance(v, list) else [v]) if r]

    def present(ref: str) -> bool:
        module = ref.rsplit(".", 1)[0]
        return "--" not in ref and (folder / (module.replace(".", "/") + ".py")).is_file()

    if "auto_map" in d and not all(present(r) for r in refs):
        d = {k: v for k, v in d.items() if k != "auto_map"}
    return d


def save(model: Transformer, path: str | os.PathLike, tokenizer=None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a Hugging Face folder (config.json, safetensors, generation_config.json [, tokenizer])."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    d = _without_remote_code(cfg.to_hf(), folder)
    d["torch_dtype"] = d["dtype"] = {v: k for k, v in DTYPES.items()}.get(dtype, "float32")
    (folder / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
           "temperature": 0.6, "top_p": 0.95}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for old in list(folder.glob("model*.safetensors")) + [folder / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    # Write each shard as soon as it is full (memory: one shard, not a second copy of the model); the final
    # names need the shard count, so shards are renamed at the end.
    meta = {"format": "pt"}
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        tmp = folder / f"model-part{len(written):05d}.safetensors.tmp"
        save_file(shard, tmp, metadata=meta)
        written.append((tmp, list(shard)))

    for name, t in ours_to_hf(model):
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = t.detach().to("cpu").contiguous().clone()
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        os.replace(written[0][0], folder / "model.safetensors")
    else:
        weight_map = {}
        for i, (tmp, names) in enumerate(written):
            fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            os.replace(tmp, folder / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def load_model_and_tokenizer(folder: str | os.PathLike, dtype: torch.dtype | str | None = None, device=None,
                             purpose: str = "this command"):
    """A model folder or .gguf file -> (model, tokenizer): the one loader behind eval, chat, serve and the
    post-training recipes (a GGUF file carries its tokenizer in its metadata). A missing folder, file, config.json
    or tokenizer.json is one clear UsageError (what is wrong, what to pass)."""
    from .tokenizer import Tokenizer

    path = Path(folder)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"GGUF file {folder} does not exist; pass a .gguf file or a model folder")
        return load(path, dtype=dtype, device=device), Tokenizer.load(path)
    if not path.is_dir():
        raise UsageError(f"model folder {folder} does not exist; pass the folder written by `nanoseek "
                         f"pretrain/sft/grpo` (its final/ or ckpt/step-N/), a Hugging Face folder (DeepSeek-V2/V3, "
                         f"qwen2, llama, qwen3) or a .gguf file")
    if not (path / "config.json").is_file():
        raise UsageError(f"{folder} is not a model folder (no config.json); pass the folder written by `nanoseek "
                         f"pretrain/sft/grpo`, a Hugging Face folder (DeepSeek-V2/V3, qwen2, llama, qwen3) or a "
                         f".gguf file")
    if not (path / "tokenizer.json").is_file():
        raise UsageError(f"{folder} has no tokenizer.json: {purpose} needs the model's tokenizer in its folder (save "
                         f"the model with ns.save(model, folder, tokenizer=tok), or copy tokenizer*.json there)")
    return load(path, dtype=dtype, device=device), Tokenizer.load(path)
