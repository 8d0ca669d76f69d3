"""load() / save() of Hugging Face model folders: config.json + safetensors (single file or sharded).

Reads DeepSeek-V2/V3 folders as published (bf16, or FP8 e4m3 with 128x128 `weight_scale_inv` blocks, which are
dequantised on load) and as transformers saves them; writes folders that transformers loads unchanged. Only
safetensors are ever read: pickled weights (.bin/.pt) are refused, never unpickled.

Loading streams: the model is built on the meta device, allocated once, and each tensor is read from its file
and copied into place, so peak memory is the model plus one tensor.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import UsageError
from .model.rope import RotaryEmbedding
from .model.transformer import Transformer

_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the main model's, which we share
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(UsageError, ValueError):
    """A model folder that cannot be read, with the file and tensor at fault (a UsageError: the CLI prints it)."""


def hf_to_ours(name: str, cfg: ModelConfig) -> tuple[str, int | None] | None:
    """Map a checkpoint tensor name to (our parameter name, expert index or None); None for tensors we skip."""
    if name == "model.embed_tokens.weight":
        return "embed_tokens.weight", None
    if name == "model.norm.weight":
        return "norm.weight", None
    if name == "lm_head.weight":
        return "lm_head.weight", None
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    L = cfg.num_hidden_layers
    if i < L:
        prefix = f"layers.{i}."
    else:
        k = i - L
        if rest in _MTP_SHARED:
            return None
        if rest.startswith(_MTP_OWN):
            return f"mtp.{k}.{rest}", None
        prefix = f"mtp.{k}.block."
    e = _EXPERT.match(rest)
    if e:
        return f"{prefix}mlp.experts.{e.group(2)}", int(e.group(1))
    return prefix + rest, None


def ours_to_hf(model: Transformer):
    """Yield (checkpoint name, tensor) for every tensor of the model, experts unstacked, MTP in published form."""
    cfg = model.cfg
    L = cfg.num_hidden_layers
    state = model.state_dict()
    for name, t in state.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name in ("embed_tokens.weight", "norm.weight"):
            yield f"model.{name}", t
            continue
        if name == "lm_head.weight":
            yield name, t
            continue
        m = re.match(r"^(layers\.(\d+)\.|mtp\.(\d+)\.(block\.)?)(.+)$", name)
        if not m:
            continue  # non-persistent or derived state
        layer = int(m.group(2)) if m.group(2) is not None else L + int(m.group(3))
        rest = m.group(5)
        e = re.match(r"^mlp\.experts\.(gate_proj|up_proj|down_proj)$", rest)
        if e:
            for j in range(t.shape[0]):
                yield f"model.layers.{layer}.mlp.experts.{j}.{e.group(1)}.weight", t[j]
            continue
        yield f"model.layers.{layer}.{rest}", t
    for k in range(len(model.mtp)):  # published MTP layers carry their own copies of the shared embedding/head
        yield f"model.layers.{L + k}.embed_tokens.weight", state["embed_tokens.weight"]
        yield f"model.layers.{L + k}.shared_head.head.weight", state["lm_head.weight"]


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


def _dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 e4m3 weight with one float32 scale per (block x block) tile -> float32 weight = tile * scale_inv."""
    out_f, in_f = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:out_f].repeat_interleave(block[1], 1)[:, :in_f]
    return w.float() * s


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device=None) -> Transformer:
    """Load a DeepSeek-V2/V3 Hugging Face folder (ours, transformers', or as published, bf16 or FP8)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a Hugging Face model folder with config.json)")
    cfg = read_config(folder)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not supported: expected one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype is None:
        dtype = _DTYPES.get(cfg.torch_dtype or cfg.extra.get("dtype") or "float32", torch.float32)
    files = _weight_files(folder)
    L = cfg.num_hidden_layers
    has_mtp = any(re.match(rf"^model\.layers\.{L + k}\.", n) for n in files for k in range(cfg.num_nextn_predict_layers))
    if cfg.num_nextn_predict_layers and not has_mtp:
        warnings.warn(f"{folder}: config.json declares {cfg.num_nextn_predict_layers} MTP layer(s) but the weights "
                      f"hold none (transformers drops them on save); loading without MTP", stacklevel=2)
        cfg.num_nextn_predict_layers = 0
    block = tuple((cfg.quantization_config or {}).get("weight_block_size", (128, 128)))
    cfg.quantization_config = None  # dequantised on load: what we hold, and save, is plain weights
    cfg.torch_dtype = {v: k for k, v in _DTYPES.items()}[dtype]

    model = _empty_model(cfg, dtype, device)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    filled = _fill(params, files, cfg, block)
    _check_complete(folder, params, filled, files, cfg)
    return model.eval()


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device) -> Transformer:
    """An uninitialised model in its final dtype and device (routing bias float32 and zero)."""
    # Shapes and dtype are decided on the meta device, so the one allocation is in the final dtype (no float32
    # copy of a bf16 model); the routing bias stays float32 whatever the model's dtype, as published.
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    for m in model.modules():
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias = m.e_score_correction_bias.float()
    model = model.to_empty(device=device or "cpu")
    model.rotary = RotaryEmbedding(cfg).to(device or "cpu")
    for m in model.modules():
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.zero_()
    return model


def _read_tensor(sf, name: str, f: Path, files: dict[str, Path], block: tuple[int, int]) -> torch.Tensor:
    """One tensor of the open safetensors file `sf`, FP8 e4m3 dequantised with its block scales (which may sit in
    another shard)."""
    t = sf.get_tensor(name)
    if t.dtype != torch.float8_e4m3fn:
        return t
    sname = name.replace(".weight", ".weight_scale_inv")
    if sname not in files:
        raise CheckpointError(f"{f}: FP8 tensor {name} has no {sname} (the block scales are needed to dequantise it)")
    with safe_open(files[sname], "pt", device="cpu") as ssf:
        scale_inv = ssf.get_tensor(sname)
    want = tuple(-(-n // b) for n, b in zip(t.shape, block))  # ceil(out/128), ceil(in/128)
    if t.dim() != 2 or tuple(scale_inv.shape) != want:
        raise CheckpointError(f"{files[sname]}: {sname} has shape {tuple(scale_inv.shape)}, expected "
                              f"{want} for {name} {tuple(t.shape)} in {block[0]}x{block[1]} blocks")
    return _dequantize_fp8(t, scale_inv, block)


def _fill(params: dict, files: dict[str, Path], cfg: ModelConfig, block) -> dict[str, set]:
    """Stream every weight file tensor by tensor into `params`; returns what was filled (name -> expert ids)."""
    filled: dict[str, set] = defaultdict(set)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, f in files.items():
        by_file[f].append(name)
    for f, names in by_file.items():
        if not f.exists():
            raise CheckpointError(f"{f}: listed in model.safetensors.index.json but missing")
        _keys(f)  # a clear error for a corrupt or non-safetensors file
        with safe_open(f, "pt", device="cpu") as sf:
            for name in names:
                if name.endswith(".weight_scale_inv") or name.endswith("rotary_emb.inv_freq"):
                    continue
                target = hf_to_ours(name, cfg)
                if target is None:
                    continue
                ours, expert = target
                if ours not in params:
                    raise CheckpointError(f"{f}: tensor {name} does not belong to a {cfg.model_type} model with this "
                                          f"config.json (num_hidden_layers={cfg.num_hidden_layers}, "
                                          f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}, "
                                          f"n_routed_experts={cfg.n_routed_experts})")
                t = _read_tensor(sf, name, f, files, block)
                if expert is not None and expert >= params[ours].shape[0]:
                    raise CheckpointError(f"{f}: tensor {name} is expert {expert} but config.json has "
                                          f"n_routed_experts={cfg.n_routed_experts}")
                dst = params[ours] if expert is None else params[ours][expert]
                if tuple(t.shape) != tuple(dst.shape):
                    raise CheckpointError(f"{f}: tensor {name} has shape {tuple(t.shape)} but config.json implies "
                                          f"{tuple(dst.shape)} (check hidden_size, heads, ranks and expert sizes)")
                with torch.no_grad():
                    dst.copy_(t.to(dst.dtype) if ours.endswith("e_score_correction_bias") else t)
                filled[ours].add(expert)
    return filled


def _check_complete(folder: Path, params: dict, filled: dict[str, set], files: dict[str, Path],
                    cfg: ModelConfig) -> None:
    """Every parameter the config implies was in the files (else name the first missing tensor)."""
    for ours, p in params.items():
        if ours.startswith("rotary.") or (ours == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        if ours.endswith("e_score_correction_bias") and cfg.topk_method != "noaux_tc":
            continue
        if ours.endswith("e_score_correction_bias") and ours not in filled:
            continue  # absent in some exports: zero bias, which is what training starts from
        want = set(range(p.shape[0])) if ".mlp.experts." in ours else {None}
        missing = want - filled.get(ours, set())
        if missing:
            hf = next(n for n, _ in ours_to_hf_names(ours, missing, cfg))
            searched = ", ".join(sorted({f.name for f in files.values()}))
            raise CheckpointError(f"{folder}: tensor {hf} is missing from the weight files ({searched}) although "
                                  f"config.json implies it")


def ours_to_hf_names(ours: str, experts, cfg: ModelConfig):
    """Checkpoint names of one of our parameters (for error messages)."""
    L = cfg.num_hidden_layers
    m = re.match(r"^(layers\.(\d+)\.|mtp\.(\d+)\.(block\.)?)(.+)$", ours)
    if not m:
        yield ("model." + ours if ours != "lm_head.weight" else ours), None
        return
    layer = int(m.group(2)) if m.group(2) is not None else L + int(m.group(3))
    rest = m.group(5)
    e = re.match(r"^mlp\.experts\.(\w+)$", rest)
    if e:
        for j in sorted(x for x in experts if x is not None):
            yield f"model.layers.{layer}.mlp.experts.{j}.{e.group(1)}.weight", j
        return
    yield f"model.layers.{layer}.{rest}", None


def save(model: Transformer, path: str | os.PathLike, tokenizer=None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a Hugging Face folder (config.json, safetensors, generation_config.json [, tokenizer])."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    d = cfg.to_hf()
    d["torch_dtype"] = d["dtype"] = {v: k for k, v in _DTYPES.items()}.get(dtype, "float32")
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
    """A model folder -> (model, tokenizer): the one loader behind eval, chat, serve and the post-training recipes.
    A missing folder, config.json or tokenizer.json is one clear UsageError (what is wrong, what to pass)."""
    from .tokenizer import Tokenizer

    path = Path(folder)
    if not path.is_dir():
        raise UsageError(f"model folder {folder} does not exist; pass the folder written by `nanoseek "
                         f"pretrain/sft/grpo` (its final/ or ckpt/step-N/) or a Hugging Face DeepSeek-V2/V3 folder")
    if not (path / "config.json").is_file():
        raise UsageError(f"{folder} is not a model folder (no config.json); pass the folder written by `nanoseek "
                         f"pretrain/sft/grpo` or a Hugging Face DeepSeek-V2/V3 folder")
    if not (path / "tokenizer.json").is_file():
        raise UsageError(f"{folder} has no tokenizer.json: {purpose} needs the model's tokenizer in its folder (save "
                         f"the model with ns.save(model, folder, tokenizer=tok), or copy tokenizer*.json there)")
    return load(path, dtype=dtype, device=device), Tokenizer.load(path)
