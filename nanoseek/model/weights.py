"""Checkpoint tensor names <-> our parameters, and a model built from a stream of named tensors.

Every family keeps transformers' tensor names (model.layers.N.self_attn.q_proj.weight, ...mlp.experts.E.up_proj
.weight, lm_head.weight absent when tied), so the readers only have to produce (name, tensor) pairs:
checkpoint.py from safetensors files, gguf.py from a GGUF file. `build_from_tensors` allocates the model once, in
its final dtype, and copies each tensor into place as it arrives: peak memory is the model plus one tensor.

This module reads no file (the readers do): it lives here, below both readers, so that checkpoint.load can hand a
.gguf path to gguf.py while gguf.py builds its model with this function, without an import cycle.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch

from ..config import ModelConfig
from ..errors import UsageError
from .transformer import Transformer

_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the main model's, which we share
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Projections that read the same input run as one matmul: one parameter whose rows are the checkpoint's tensors
# stacked in this order (weights and biases alike; stacked experts per expert). Checkpoints keep the separate
# tensors, so hf_to_ours names a part of a fused parameter and ours_to_hf splits it.
FUSED = {"gate_up_proj": ("gate_proj", "up_proj"),                   # MLP, shared and routed experts
         "qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),           # MLA with q_lora_rank
         "qkv_proj": ("q_proj", "k_proj", "v_proj")}                 # GQA
_PART = {part: (fused, i) for fused, parts in FUSED.items() for i, part in enumerate(parts)}
_MODULE = re.compile(r"^(.*?)(\w+)(\.weight|\.bias|)$")             # path., module name, .weight/.bias/""


def fuse_param_state(state: dict, groups: list[dict]) -> tuple[dict, list[dict]]:
    """Optimizer state of a run saved before the projections were fused ({fqn: {"exp_avg": t, "step": ...}} and the
    param groups' names), keyed by the fused names: each tensor is its parts' tensors stacked along the output rows,
    as the fused weight stacks them; a scalar (step) is the first part's. State already fused passes unchanged."""
    parts: dict[str, dict[int, str]] = {}
    for fqn in state:
        path, module, suffix = _MODULE.match(fqn).groups()
        if module in _PART:
            fused, i = _PART[module]
            parts.setdefault(f"{path}{fused}{suffix}", {})[i] = fqn
    renamed = {}
    for new, got in parts.items():
        if len(got) != len(FUSED[_MODULE.match(new).group(2)]):
            continue                                      # not a whole group: this model keeps them apart
        olds = [got[i] for i in sorted(got)]
        first = state[olds[0]]
        state[new] = {k: torch.cat([state[o][k] for o in olds], dim=-2 if v.dim() >= 2 else 0)
                      if torch.is_tensor(v) and v.dim() >= 1 else v for k, v in first.items()}
        for o in olds:
            renamed[o] = new
            del state[o]
    groups = [{**g, "params": list(dict.fromkeys(renamed.get(p, p) for p in g["params"]))} for g in groups]
    return state, groups


# DeepSeek-V4: transformers writes (and reads) the published tensor names; our modules carry transformers' own
# names (model/v4.py). Per layer: (published suffix, ours); routed experts (ffn.experts.E.w1/w3/w2) are separate.
_V4_ATTN = [("wq_a.weight", "q_a_proj.weight"), ("q_norm.weight", "q_a_norm.weight"), ("wq_b.weight", "q_b_proj.weight"),
            ("wkv.weight", "kv_proj.weight"), ("norm.weight", "kv_norm.weight"), ("wo_a.weight", "o_a_proj.weight"),
            ("wo_b.weight", "o_b_proj.weight"), ("attn_sink", "sinks")]
_V4_COMPRESSOR = [("wkv.weight", "kv_proj.weight"), ("wgate.weight", "gate_proj.weight"), ("ape", "position_bias"),
                  ("norm.weight", "kv_norm.weight")]
_V4_LAYER = dict(
    [(f"attn.{a}", f"self_attn.{b}") for a, b in _V4_ATTN]
    + [(f"attn.compressor.{a}", f"self_attn.compressor.{b}") for a, b in _V4_COMPRESSOR]
    + [(f"attn.indexer.compressor.{a}", f"self_attn.compressor.indexer.{b}") for a, b in _V4_COMPRESSOR]
    + [("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
       ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
       ("attn_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight"),
       ("ffn.gate.weight", "mlp.gate.weight"), ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
       ("ffn.gate.tid2eid", "mlp.gate.tid2eid"), ("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"),
       ("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"),
       ("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight")]
    + [(f"hc_{side}_{p}", f"{side}_hc.{p}") for side in ("attn", "ffn") for p in ("fn", "base", "scale")])
_V4_OURS = {b: a for a, b in _V4_LAYER.items()}
_V4_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_V4_EXPERT_PART = {"w1": ("mlp.experts.gate_up_proj", 0), "w3": ("mlp.experts.gate_up_proj", 1),
                   "w2": ("mlp.experts.down_proj", None)}
# V4's MTP module (model/v4_mtp.py) as published, mtp.K.*, which transformers drops: its block's tensors named as a
# layer's (the attention's kv norm spelled attn.kv_norm), its own hc_head_*; e_proj, h_proj, enorm, hnorm, norm as ours
_V4_MTP = {**{a: b for a, b in _V4_LAYER.items() if a != "attn.norm.weight"}, "attn.kv_norm.weight":
           "self_attn.kv_norm.weight", **{f"hc_head_{p}": f"hc_head.hc_{p}" for p in ("fn", "base", "scale")}}
_V4_MTP_OURS = {b: a for a, b in _V4_MTP.items()}


# Top-level tensors: DeepSeek's published folders name them without transformers' "model." prefix (embed.weight,
# hc_head_fn, norm.weight, head.weight, layers.N.*); transformers writes model.embed_tokens.weight, model.hc_head.*.
_V4_TOP = {"head.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight", "embed.weight": "embed_tokens.weight",
           "hc_head_fn": "hc_head.hc_fn", "hc_head_base": "hc_head.hc_base", "hc_head_scale": "hc_head.hc_scale"}


def _v4_hf_to_ours(name: str, n_mtp: int) -> tuple[str, int | None, int | None] | None:
    """hf_to_ours for deepseek_v4: published names (DeepSeek's, and the prefixed ones transformers writes), or
    transformers' module names."""
    mtp = re.match(r"^mtp\.(\d+)\.(.+)$", name)
    if mtp:
        if int(mtp.group(1)) >= n_mtp:
            return None                                  # a model built without MTP skips it, as transformers does
        e = _V4_EXPERT.match(mtp.group(2))
        ours, part = _V4_EXPERT_PART[e.group(2)] if e else (_V4_MTP.get(mtp.group(2), mtp.group(2)), None)
        return f"mtp.{mtp.group(1)}.{ours}", int(e.group(1)) if e else None, part
    rest = name.removeprefix("model.")
    if rest in _V4_TOP:
        return _V4_TOP[rest], None, None
    m = re.match(r"^layers\.(\d+)\.(.+)$", rest)
    if not m:   # embed_tokens, norm, hc_head.*; not a run checkpoint's optimizer and RNG state (optim/..., rng.*)
        return (rest, None, None) if name.startswith(("model.", "norm.")) else None
    prefix, rest = f"layers.{m.group(1)}.", m.group(2)
    e = _V4_EXPERT.match(rest)
    if e:
        ours, part = _V4_EXPERT_PART[e.group(2)]
        return prefix + ours, int(e.group(1)), part
    if rest == "attn.kv_norm.weight":                 # DeepSeek's name (as its MTP's); transformers writes attn.norm
        rest = "attn.norm.weight"
    return prefix + _V4_LAYER.get(rest, rest), None, None


def _v4_ours_to_hf(model):
    """ours_to_hf for deepseek_v4: the published names transformers writes, routed experts one tensor each."""
    for name, t in model.state_dict().items():
        m = re.match(r"^(layers|mtp)\.(\d+)\.(.+)$", name)
        if name.startswith("rotary."):
            continue
        if not m:
            yield ("head.weight" if name == "lm_head.weight" else f"model.{name}"), t
            continue
        prefix, rest = (f"model.layers.{m.group(2)}." if m.group(1) == "layers" else f"mtp.{m.group(2)}."), m.group(3)
        if rest == "mlp.experts.gate_up_proj":
            for j in range(t.shape[0]):
                gate, up = t[j].chunk(2)
                yield f"{prefix}ffn.experts.{j}.w1.weight", gate
                yield f"{prefix}ffn.experts.{j}.w3.weight", up
        elif rest == "mlp.experts.down_proj":
            for j in range(t.shape[0]):
                yield f"{prefix}ffn.experts.{j}.w2.weight", t[j]
        else:
            yield prefix + (_V4_OURS if m.group(1) == "layers" else _V4_MTP_OURS).get(rest, rest), t


class CheckpointError(UsageError, ValueError):
    """A model folder that cannot be read, with the file and tensor at fault (a UsageError: the CLI prints it)."""


def _fused(module: str, cfg: ModelConfig) -> tuple[str, int] | None:
    """(our fused module, part index) of a checkpoint module name (gate_proj, q_a_proj, ...), or None where this
    model keeps it separate (MLA's q_proj and kv_a_proj_with_mqa without q_lora_rank)."""
    fused = _PART.get(module)
    if fused is None or (fused[0] == "qkv_a_proj" and not cfg.q_lora_rank):
        return None
    if fused[0] == "qkv_proj" and cfg.attention != "gqa":
        return None
    return fused


def part_sizes(ours: str, rows: int, cfg: ModelConfig) -> list[int]:
    """Rows of each checkpoint tensor inside the fused parameter `ours` (or one expert of it) of `rows` rows."""
    fused = _MODULE.match(ours).group(2)
    if fused == "qkv_a_proj":
        return [cfg.q_lora_rank, rows - cfg.q_lora_rank]
    if fused == "qkv_proj":
        kv = cfg.num_key_value_heads * cfg.head_dim
        return [rows - 2 * kv, kv, kv]
    return [rows // 2, rows // 2]


def hf_to_ours(name: str, cfg: ModelConfig) -> tuple[str, int | None, int | None] | None:
    """Map a checkpoint tensor name to (our parameter name, expert index or None, part index or None); the part
    is the tensor's place in a fused parameter (FUSED). None for tensors we skip."""
    if cfg.model_type == "deepseek_v4":
        return _v4_hf_to_ours(name, cfg.num_nextn_predict_layers)
    if name == "model.embed_tokens.weight":
        return "embed_tokens.weight", None, None
    if name == "model.norm.weight":
        return "norm.weight", None, None
    if name == "lm_head.weight":  # tied: the embedding is the head (transformers ignores the copy too)
        return None if cfg.tie_word_embeddings else ("lm_head.weight", None, None)
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
            return f"mtp.{k}.{rest}", None, None
        prefix = f"mtp.{k}.block."
    expert = None
    e = _EXPERT.match(rest)
    if e:
        expert, rest = int(e.group(1)), f"mlp.experts.{e.group(2)}"
    path, module, suffix = _MODULE.match(rest).groups()
    fused = _fused(module, cfg)
    if fused is None:
        return prefix + rest, expert, None
    return f"{prefix}{path}{fused[0]}{suffix}", expert, fused[1]


def ours_to_hf(model: Transformer):
    """Yield (checkpoint name, tensor) for every tensor of the model, experts unstacked, MTP in published form.

    Leaves out what the family's own checkpoints do not hold: lm_head when tied to the embedding, and the
    routing bias e_score_correction_bias unless the routing uses it (noaux_tc): published V2 folders have none,
    and transformers reports an extra one as UNEXPECTED."""
    cfg = model.cfg
    if cfg.model_type == "deepseek_v4":
        yield from _v4_ours_to_hf(model)
        return
    L = cfg.num_hidden_layers
    state = model.state_dict()
    for name, t in state.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("e_score_correction_bias") and cfg.topk_method != "noaux_tc":
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
        e = re.match(r"^mlp\.experts\.(\w+)$", rest)
        if e:
            for j in range(t.shape[0]):
                yield from _split(f"model.layers.{layer}.mlp.experts.{j}.", e.group(1), ".weight", t[j], name, cfg)
            continue
        path, module, suffix = _MODULE.match(rest).groups()
        yield from _split(f"model.layers.{layer}.{path}", module, suffix, t, name, cfg)
    for k in range(len(model.mtp)):  # published MTP layers carry their own copies of the shared embedding/head
        yield f"model.layers.{L + k}.embed_tokens.weight", state["embed_tokens.weight"]
        yield f"model.layers.{L + k}.shared_head.head.weight", state["lm_head.weight"]


def _split(prefix: str, module: str, suffix: str, t: torch.Tensor, ours: str, cfg: ModelConfig):
    """(checkpoint name, tensor) of one module's weight or bias: the fused ones (FUSED) split into their parts."""
    parts = FUSED.get(module)
    if parts is None:
        yield f"{prefix}{module}{suffix}", t
        return
    for part, piece in zip(parts, t.split(part_sizes(ours, t.shape[0], cfg))):
        yield f"{prefix}{part}{suffix}", piece


def ours_to_hf_names(ours: str, keys, cfg: ModelConfig):
    """Checkpoint names of the (expert, part) keys of one of our parameters (for error messages)."""
    L = cfg.num_hidden_layers
    m = re.match(r"^(layers\.(\d+)\.|mtp\.(\d+)\.(block\.)?)(.+)$", ours)
    if not m:
        yield ("model." + ours if ours != "lm_head.weight" else ours)
        return
    layer = int(m.group(2)) if m.group(2) is not None else L + int(m.group(3))
    e = re.match(r"^mlp\.experts\.(\w+)$", m.group(5))
    path, module, suffix = _MODULE.match(m.group(5)).groups()
    for expert, part in sorted(keys, key=lambda k: (k[0] or 0, k[1] or 0)):
        if e:
            path, suffix = f"mlp.experts.{expert}.", ".weight"
        yield f"model.layers.{layer}.{path}{module if part is None else FUSED[module][part]}{suffix}"


def empty_model(cfg: ModelConfig, dtype: torch.dtype, device=None) -> Transformer:
    """An uninitialised model in its final dtype and device (routing bias float32 and zero)."""
    # Shapes and dtype are decided on the meta device, so the one allocation is in the final dtype (no float32
    # copy of a bf16 model); the routing bias stays float32 whatever the model's dtype, as published.
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    for m in model.modules():
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias = m.e_score_correction_bias.float()
    model = model.to_empty(device=device or "cpu")
    if cfg.tie_word_embeddings:  # to_empty allocates each module's tensors anew, which unties the head
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = type(model.rotary)(cfg).to(device or "cpu")     # RotaryEmbedding, or V4's two tables
    for m in model.modules():
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.zero_()
    return model


def resolve_dtype(dtype: torch.dtype | str | None, cfg: ModelConfig) -> torch.dtype:
    """A dtype, its name, or None for the config's own (torch_dtype / dtype; float32 when it names none)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not supported: expected one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype is None:
        return DTYPES.get(cfg.torch_dtype or cfg.extra.get("dtype") or "float32", torch.float32)
    return dtype


def build_from_tensors(cfg: ModelConfig, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       source: str | Callable[[str], str], dtype: torch.dtype | str | None = None,
                       device=None) -> Transformer:
    """A model of `cfg` filled from (checkpoint name, tensor) pairs, consumed one at a time (the caller may read
    each tensor lazily: only one is alive at once). Tensors are cast to `dtype` (default: the config's, else
    float32) except the float32 routing bias. Every parameter must arrive exactly in its shape; names that
    belong to no parameter are an error; rotary inv_freq copies are skipped. `source` names where the tensors
    come from in error messages: a path, or a function of the tensor name (the file that holds it).
    Returns the model in eval mode, with cfg.torch_dtype set to the dtype it holds."""
    dtype = resolve_dtype(dtype, cfg)
    cfg.torch_dtype = {v: k for k, v in DTYPES.items()}[dtype]
    where = source if callable(source) else (lambda name: str(source))
    model = empty_model(cfg, dtype, device)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    filled = _fill(params, named_tensors, cfg, where)
    _check_complete(params, filled, cfg, where)
    return model.eval()


def _fill(params: dict, named_tensors, cfg: ModelConfig, where) -> dict[str, set]:
    """Copy each tensor into its parameter (its expert's slice, its rows of a fused parameter) as it arrives;
    returns what was filled: our name -> set of (expert, part)."""
    filled: dict[str, set] = defaultdict(set)
    for name, t in named_tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        target = hf_to_ours(name, cfg)
        if target is None:
            continue
        ours, expert, part = target
        if ours not in params:
            raise CheckpointError(f"{where(name)}: tensor {name} does not belong to a {cfg.model_type} model with "
                                  f"this config (num_hidden_layers={cfg.num_hidden_layers}, "
                                  f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}, "
                                  f"n_routed_experts={cfg.n_routed_experts})")
        if expert is not None and expert >= params[ours].shape[0]:
            raise CheckpointError(f"{where(name)}: tensor {name} is expert {expert} but the config has "
                                  f"n_routed_experts={cfg.n_routed_experts}")
        dst = params[ours] if expert is None else params[ours][expert]
        if part is not None:
            dst = dst.split(part_sizes(ours, dst.shape[0], cfg))[part]
        if tuple(t.shape) != tuple(dst.shape):
            raise CheckpointError(f"{where(name)}: tensor {name} has shape {tuple(t.shape)} but config.json implies "
                                  f"{tuple(dst.shape)} (check hidden_size, heads, head_dim, ranks and expert sizes)")
        with torch.no_grad():
            dst.copy_(t)
        del t  # before the stream reads the next one: one tensor alive at a time
        filled[ours].add((expert, part))
    return filled


def _check_complete(params: dict, filled: dict[str, set], cfg: ModelConfig, where) -> None:
    """Every parameter the config implies was given, every part of a fused one (else name the first missing
    tensor)."""
    for ours, p in params.items():
        if ours.startswith("rotary.") or (ours == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        if ours.endswith("e_score_correction_bias") and (cfg.topk_method != "noaux_tc" or ours not in filled):
            continue  # unused by this routing, or absent in some exports: zero, which is what training starts from
        experts = range(p.shape[0]) if ".mlp.experts." in ours else [None]
        parts = FUSED.get(_MODULE.match(ours).group(2))
        want = {(e, k) for e in experts for k in (range(len(parts)) if parts else [None])}
        missing = want - filled.get(ours, set())
        if missing:
            hf = next(ours_to_hf_names(ours, missing, cfg))
            raise CheckpointError(f"{where(hf)}: tensor {hf} is missing although config.json implies it")
