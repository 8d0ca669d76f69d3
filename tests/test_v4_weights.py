"""DeepSeek-V4 folders in the layout DeepSeek publishes load to the dequantised values exactly.

The published layout (DeepSeek-V4-Pro's folder as listed tensor by tensor, name, dtype and shape; DeepSeek's
inference/model.py and kernel.py; transformers 5.24's FineGrainedFP8Config and Fp8Dequantize), made here from a
random tiny-v4 model with one MTP layer:
- DeepSeek's own tensor names, without transformers' "model." prefix: embed.weight, layers.N.attn.wq_a.weight,
  layers.N.attn.kv_norm.weight, layers.N.ffn.experts.E.w1.weight, hc_head_fn, norm.weight, head.weight, mtp.0.*.
- FP8 e4m3 weights with one UE8M0 scale (float8_e8m0fnu, 2^(byte-127)) per 128x128 block, named X.scale: the
  attention's wq_a, wq_b, wkv, wo_a (the grouped output projection), wo_b, the indexer's wq_b, the shared experts'
  w1/w2/w3 and MTP's e_proj/h_proj (transformers' quantizer renames X.scale to X.weight_scale_inv).
- FP4 e2m1 routed experts: int8 tensors (out, in/2), two values per byte, the low nibble the even input; one UE8M0
  scale per row and 32 inputs, (out, in/32) (V4-Pro: w1 int8 (3072, 3584), scale (3072, 224)).
- Not quantised: embeddings, head, norms, the router's weight, the compressors' wkv/wgate and the indexer's
  weights_proj in bf16; hc_*, attn_sink, ape and the routing bias in float32; tid2eid int64.
- config.json: quantization_config {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
  "scale_fmt": "ue8m0", "weight_block_size": [128, 128]} and no expert_dtype (V4-Pro's); DeepSeek's inference
  config has "expert_dtype": "fp4" at the top level, V4.1 and transformers inside quantization_config: all load.

The test draws the stored codes at random (every FP8 byte but NaN, every FP4 nibble) and the scale exponents per
block, and decodes them itself, with its own e2m1 decoding from the format's bit fields: ns.load must give these
values exactly (torch.equal), the logits of the loaded model must equal those of the same model with the decoded
values placed directly, and transformers (which dequantises such a folder on a machine without a GPU) must hold the
same tensors. Negative controls: the nibbles swapped, or one scale off by one exponent, fail the comparison.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import nanoseek as ns
from nanoseek.checkpoint import CheckpointError, ours_to_hf
from nanoseek.config import ModelConfig
from nanoseek.model.transformer import Transformer

FP8 = re.compile(r"^(layers|mtp)\.\d+\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|ffn\.shared_experts\.w[123]"
                 r"|[eh]_proj)\.weight$")
FP4 = re.compile(r"^(layers|mtp)\.\d+\.ffn\.experts\.\d+\.w[123]\.weight$")
FLOAT32 = re.compile(r"(hc_|attn_sink$|\.ape$|gate\.bias$)")
TOP = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
       "hc_head.hc_scale": "hc_head_scale"}
PUBLISHED_QC = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                "weight_block_size": [128, 128]}
IDS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))


def e2m1(code: int) -> float:
    """One FP4 code from its bit fields: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return sign * (m / 2 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1))


E2M1 = torch.tensor([e2m1(c) for c in range(16)])


def test_e2m1_table_is_the_published_one():
    assert E2M1.tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6]


def e8m0(exps: torch.Tensor) -> torch.Tensor:
    return (exps + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def fp8_weight(shape, block, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight of random codes, UE8M0 scales, the float32 value each weight stands for)."""
    codes = torch.randint(0, 256, shape, generator=gen).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x38                     # no NaN code (0x38 is 1.0)
    q = codes.view(torch.float8_e4m3fn)
    exps = torch.randint(-12, -8, (-(-shape[0] // block[0]), -(-shape[1] // block[1])), generator=gen)
    value = torch.empty(shape)
    for i in range(exps.shape[0]):
        for j in range(exps.shape[1]):
            tile = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            value[tile] = q[tile].float() * 2.0 ** exps[i, j].item()
    return q, e8m0(exps), value


def fp4_weight(shape, gen, swap_nibbles=False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 bytes (out, in/2), UE8M0 scales (out, in/32), the float32 value each weight stands for)."""
    out, n = shape
    codes = torch.randint(0, 16, shape, generator=gen)
    exps = torch.randint(-6, -2, (out, n // 32), generator=gen)
    even, odd = codes[:, 0::2], codes[:, 1::2]
    if swap_nibbles:
        even, odd = odd, even
    packed = (even | (odd << 4)).to(torch.uint8).view(torch.int8)
    value = E2M1[codes] * torch.exp2(exps.float()).repeat_interleave(32, dim=1)
    return packed, e8m0(exps), value


def random_model() -> Transformer:
    """tiny-v4 (every layer type, hash and learned routing) and one MTP layer, as published, with weights that move
    the logits; moe_intermediate_size 64, so that every routed expert matrix holds two FP4 blocks per row."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny-v4", moe_intermediate_size=64, num_nextn_predict_layers=1)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() < 2 else 0.15)
    return model


def published(model: Transformer) -> dict[str, torch.Tensor]:
    """DeepSeek's names -> the model's tensors (views: writing into them writes into the model). ours_to_hf writes
    transformers' names: prefixed by "model.", the attention's kv norm as attn.norm."""
    out = {}
    for name, t in ours_to_hf(model):
        name = re.sub(r"^(layers\.\d+\.attn)\.norm\.", r"\1.kv_norm.", name.removeprefix("model."))
        out[TOP.get(name, name)] = t
    return out


def write_folder(folder: Path, model: Transformer, block=(128, 128), swap_nibbles=False, qc=None, top=None,
                 store=lambda name, t: t):
    """The published folder of `model`'s shapes with random codes; the model then holds the decoded values (what
    the folder stands for). The main layers' scales go to a second shard, as a sharded folder may place them, MTP's
    stay next to their weights; store(name, tensor) may change how a tensor is stored. Returns the decoded values by published name."""
    gen = torch.Generator().manual_seed(2)
    weights, scales, values = {}, {}, {}
    with torch.no_grad():
        for name, view in published(model).items():
            if FP8.match(name):
                weights[name], scales[name.replace(".weight", ".scale")], value = fp8_weight(view.shape, block, gen)
            elif FP4.match(name):
                weights[name], scales[name.replace(".weight", ".scale")], value = fp4_weight(view.shape, gen,
                                                                                            swap_nibbles)
            elif view.is_floating_point():
                weights[name] = view.to(torch.float32 if FLOAT32.search(name) else torch.bfloat16).clone()
                value = weights[name].float()
            else:
                weights[name] = value = view.clone()               # tid2eid
            view.copy_(value)
            values[name] = value
    weights.update({n: scales.pop(n) for n in list(scales) if n.startswith("mtp.")})   # MTP's next to its weights
    weights = {n: store(n, t) for n, t in weights.items()}
    scales = {n: store(n, t) for n, t in scales.items()}
    folder.mkdir()
    save_file(weights, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(scales, folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(weights, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(scales, "model-00002-of-00002.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    d = model.cfg.to_hf()
    d.update({"torch_dtype": "bfloat16", "quantization_config": qc or {**PUBLISHED_QC, "weight_block_size": list(block)},
              **(top or {})})
    (folder / "config.json").write_text(json.dumps(d, indent=2))
    return values


def mismatches(loaded: Transformer, values: dict[str, torch.Tensor]) -> list[str]:
    """Published names whose loaded tensor is not exactly the decoded value (every tensor must be there)."""
    got = published(loaded)
    assert got.keys() == values.keys()
    return [n for n, v in values.items() if not torch.equal(got[n].to(v.dtype), v)]


@pytest.fixture(scope="module")
def folder_128(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v4") / "published"
    model = random_model()
    return folder, model, write_folder(folder, model)


def test_the_folder_is_in_the_published_layout(folder_128):
    folder, _, _ = folder_128
    dtypes = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            dtypes.update({n: sf.get_slice(n).get_dtype() for n in sf.keys()})
    listed = {"embed.weight": "BF16", "head.weight": "BF16", "norm.weight": "BF16", "hc_head_fn": "F32",
              "layers.0.ffn.gate.tid2eid": "I64", "layers.0.attn.kv_norm.weight": "BF16",
              "layers.0.attn.attn_sink": "F32", "layers.0.attn.wo_a.weight": "F8_E4M3",
              "layers.0.attn.wo_a.scale": "F8_E8M0", "layers.1.attn.compressor.wkv.weight": "BF16",
              "layers.1.attn.compressor.ape": "F32", "layers.1.attn.indexer.wq_b.scale": "F8_E8M0",
              "layers.1.attn.indexer.weights_proj.weight": "BF16", "layers.1.ffn.gate.bias": "F32",
              "layers.1.ffn.experts.3.w2.weight": "I8", "layers.1.ffn.experts.3.w2.scale": "F8_E8M0",
              "layers.1.ffn.shared_experts.w2.scale": "F8_E8M0", "mtp.0.e_proj.weight": "F8_E4M3",
              "mtp.0.h_proj.scale": "F8_E8M0", "mtp.0.ffn.experts.0.w1.weight": "I8", "mtp.0.hc_head_fn": "F32"}
    assert {n: dtypes.get(n) for n in listed} == listed
    assert not any(n.startswith("model.") or ".attn.norm." in n for n in dtypes)


def test_published_folder_loads_to_the_dequantised_values_exactly(folder_128):
    folder, _, values = folder_128
    loaded = ns.load(folder, dtype="float32")
    assert mismatches(loaded, values) == []
    assert loaded.cfg.quantization_config is None and "expert_dtype" not in loaded.cfg.extra


def test_many_blocks_per_weight_load_exactly(tmp_path):
    """16x8 FP8 blocks (published: 128x128, one block per tiny weight): every weight holds many tiles, and the
    tiles are not square, so rows and columns of the scale grid cannot be confused."""
    values = write_folder(tmp_path / "f", random_model(), block=(16, 8))
    assert mismatches(ns.load(tmp_path / "f", dtype="float32"), values) == []


def test_bfloat16_load_is_exact_for_the_quantised_weights(folder_128):
    """e4m3 and e2m1 values times a power of two fit bfloat16's 8 significant bits: no rounding on the way."""
    folder, _, values = folder_128
    loaded = ns.load(folder)                                  # config.json's torch_dtype: bfloat16
    assert next(loaded.parameters()).dtype == torch.bfloat16
    got = published(loaded)
    quantised = [n for n in values if FP8.match(n) or FP4.match(n)]
    assert len(quantised) > 40
    assert all(torch.equal(got[n].float(), values[n]) for n in quantised)


def test_logits_equal_the_model_with_the_dequantised_weights_placed_directly(folder_128):
    folder, model, _ = folder_128
    loaded = ns.load(folder, dtype="float32")
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


@pytest.mark.parametrize("where", ["top level", "quantization_config"])
def test_a_declared_expert_dtype_loads_the_same(tmp_path, where):
    """DeepSeek's inference config says "expert_dtype": "fp4" at its top level; V4.1 and transformers inside
    quantization_config."""
    qc, top = ({**PUBLISHED_QC, "expert_dtype": "fp4"}, None) if where != "top level" else (None, {"expert_dtype": "fp4"})
    values = write_folder(tmp_path / "f", random_model(), qc=qc, top=top)
    loaded = ns.load(tmp_path / "f", dtype="float32")
    assert mismatches(loaded, values) == [] and "expert_dtype" not in loaded.cfg.extra


STORAGE = {  # the same bytes and exponents under the other dtypes a folder may use
    "packed uint8": lambda n, t: t.view(torch.uint8) if t.dtype == torch.int8 else t,
    "packed float4_e2m1fn_x2": lambda n, t: t.view(torch.float4_e2m1fn_x2) if t.dtype == torch.int8 else t,
    "scales as exponent bytes": lambda n, t: t.view(torch.uint8) if t.dtype == torch.float8_e8m0fnu else t,
    "scales as float32": lambda n, t: t.float() if t.dtype == torch.float8_e8m0fnu else t,
}


@pytest.mark.parametrize("case", STORAGE)
def test_other_storage_dtypes_load_the_same(tmp_path, case):
    values = write_folder(tmp_path / "f", random_model(), store=STORAGE[case])
    assert mismatches(ns.load(tmp_path / "f", dtype="float32"), values) == []


def test_negative_controls_fail_the_comparison(tmp_path):
    """The comparison sees a layout error: nibbles in the other order, or one block's scale one exponent off."""
    model = random_model()
    write_folder(tmp_path / "swapped", model, swap_nibbles=True)   # the model holds the low-nibble-first values
    values = {n: t.clone() for n, t in published(model).items()}
    wrong = mismatches(ns.load(tmp_path / "swapped", dtype="float32"), values)
    assert wrong and all(FP4.match(n) for n in wrong)
    values = write_folder(tmp_path / "f", random_model())
    name = "layers.2.ffn.experts.5.w1.scale"
    shard = tmp_path / "f" / "model-00002-of-00002.safetensors"
    with safe_open(shard, "pt") as sf:
        scales = {n: sf.get_tensor(n) for n in sf.keys()}
    byte = scales[name].view(torch.uint8).clone()
    byte[3, 1] += 1                                              # row 3, inputs 32..63: twice the scale
    scales[name] = byte.view(torch.float8_e8m0fnu)
    save_file(scales, shard)
    assert mismatches(ns.load(tmp_path / "f", dtype="float32"), values) == [name.replace(".scale", ".weight")]


def test_transformers_dequantises_the_same_folder_to_the_same_tensors(folder_128):
    """transformers reads the published folder (FineGrainedFP8Config with expert_dtype 'fp4', dequantize=True:
    what it does by itself without a GPU): every tensor equals ours exactly, and so do the logits up to float32
    summation order (1e-5 of the largest, as tests/test_v4.py)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")                          # transformers' FP8 quantizer requires it
    folder, _, _ = folder_128
    qc = transformers.FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0", expert_dtype="fp4")
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            quantization_config=qc).eval()
    ours = ns.load(folder, dtype="float32")
    state = ours.state_dict()
    theirs = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    assert theirs.keys() == {k for k in state if not k.startswith(("rotary.", "mtp."))}   # transformers drops MTP
    assert [k for k, v in theirs.items() if not torch.equal(v.float(), state[k].float())] == []
    with torch.no_grad():
        a, b = hf(IDS).logits, ours(IDS)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


def edit_shard(folder: Path, shard: int, edit) -> None:
    """Apply edit(tensors) to one shard and write the index again from the shards' contents."""
    path = folder / f"model-0000{shard}-of-00002.safetensors"
    with safe_open(path, "pt") as sf:
        tensors = {n: sf.get_tensor(n) for n in sf.keys()}
    edit(tensors)
    save_file(tensors, path)
    weight_map = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        with safe_open(f, "pt") as sf:
            weight_map.update(dict.fromkeys(sf.keys(), f.name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def edit_config(folder: Path, **changes) -> None:
    d = json.loads((folder / "config.json").read_text())
    d.update(changes)
    (folder / "config.json").write_text(json.dumps(d))


W1, W2 = "layers.1.ffn.experts.0.w1", "layers.1.ffn.experts.0.w2"     # (64, 64): packed (64, 32), scales (64, 2)
MALFORMED = {
    "FP4 scale shape": (2, lambda t: t.update({f"{W1}.scale": t[f"{W1}.scale"][:, :1].clone()}),
                        r"w1.scale has shape \(64, 1\), expected \(64, 2\): one scale per row and per 32 inputs"),
    "FP8 scale shape": (2, lambda t: t.update({"layers.0.attn.wq_a.scale": t["layers.0.attn.wq_a.scale"].repeat(2, 1)}),
                        r"wq_a.scale has shape \(2, 1\), expected \(1, 1\)"),
    "packed width": (1, lambda t: t.update({f"{W2}.weight": t[f"{W2}.weight"][:, :31].clone()}),
                     r"w2.weight has shape \(64, 62\) but config.json implies \(64, 64\)"),
    "packed vector": (1, lambda t: t.update({f"{W2}.weight": t[f"{W2}.weight"].flatten()}),
                      r"FP4 weight .*w2.weight has shape \(2048,\); expected a matrix"),
    "missing scale": (2, lambda t: t.pop(f"{W1}.scale"), r"FP4 tensor .*w1.weight \(torch.int8\) has no block scales"),
    "FP4 scale not a power of two": (2, lambda t: t.update({f"{W1}.scale": torch.full((64, 2), 0.3)}),
                                     r"w1.scale holds 0.3.* not a power of two"),
    "scales of a bf16 weight": (2, lambda t: t.update({"layers.1.attn.compressor.wkv.scale": e8m0(torch.zeros(1, 1))}),
                                r"compressor.wkv.weight is stored as torch.bfloat16 but has block scales"),
    "unknown expert_dtype": ({"expert_dtype": "int4"}, None, r"expert_dtype='int4' is not a format nanoseek reads"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_folders_are_refused_by_name(tmp_path, case):
    where, edit, message = MALFORMED[case]
    write_folder(tmp_path / "f", random_model())
    if isinstance(where, dict):
        edit_config(tmp_path / "f", **where)
    else:
        edit_shard(tmp_path / "f", where, edit)
    with pytest.raises(CheckpointError, match=message):
        ns.load(tmp_path / "f", dtype="float32")
