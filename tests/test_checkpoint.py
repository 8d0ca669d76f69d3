"""ns.load / ns.save against the folders people have: transformers' own, published FP8 ones, sharded ones, and
broken ones (which must fail with an error naming the file and the tensor, and never unpickle anything)."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_hf_checkpoint, randomize_, rel_err
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoseek as ns
from nanoseek.checkpoint import CheckpointError, ours_to_hf
from nanoseek.errors import UsageError


def _random_model(cfg, seed=0, scale=0.2):
    """Weights large enough that routing and rope matter, and a non-zero routing bias."""
    torch.manual_seed(seed)
    model = ns.Transformer(cfg)
    model.init_weights(std=scale)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
    return model.eval()


def _ids(vocab, B=2, T=20):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(3))


V2_TINY = dict(model_type="deepseek_v2", topk_method="group_limited_greedy", scoring_func="softmax",
               norm_topk_prob=False, q_lora_rank=None, num_nextn_predict_layers=0, routed_scaling_factor=2.0)


@pytest.mark.parametrize("overrides", [{}, V2_TINY], ids=["v3-with-mtp", "v2"])
def test_saved_folder_loads_in_transformers_with_the_same_logits(tmp_path, overrides):
    import transformers

    cfg = ns.ModelConfig.preset("tiny", rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=8,
                                                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
                                **overrides)
    ours = _random_model(cfg)
    ns.save(ours, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(ref).__name__ == ("DeepseekV2ForCausalLM" if overrides else "DeepseekV3ForCausalLM")
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        assert rel_err(ours(ids), ref(ids).logits) < 1e-5  # float32, see tests/test_model.py for the tolerance


def test_mtp_layer_survives_save_and_load(tmp_path):
    cfg = ns.ModelConfig.preset("tiny")
    ours = _random_model(cfg)
    ns.save(ours, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    L = cfg.num_hidden_layers  # the published layout: the MTP module is layer num_hidden_layers
    for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
                 "embed_tokens.weight", "self_attn.kv_b_proj.weight", "mlp.experts.7.down_proj.weight"):
        assert f"model.layers.{L}.{part}" in names, part
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a folder with its MTP weights loads without the "no MTP" warning
        back = ns.load(tmp_path / "out")
    assert len(back.mtp) == 1
    want, got = ours.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_transformers_folder_declaring_mtp_without_weights_loads_without_mtp_and_warns_once(tmp_path):
    folder = make_hf_checkpoint(tmp_path, "v3", num_nextn_predict_layers=1)
    assert json.loads((folder / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ns.load(folder)
    mtp = [w for w in caught if "MTP" in str(w.message)]
    assert len(mtp) == 1 and "hold none" in str(mtp[0].message)
    assert len(model.mtp) == 0 and model.cfg.num_nextn_predict_layers == 0
    ns.save(model, tmp_path / "again")  # and what we save then says so
    assert json.loads((tmp_path / "again" / "config.json").read_text())["num_nextn_predict_layers"] == 0


# ---------------------------------------------------------------------------------------------------- FP8
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _quantize_blocks(w: torch.Tensor, block=128):
    """Block-quantise as DeepSeek publishes V3: one float32 scale_inv per 128x128 tile, fp8 = w / scale_inv."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
            scale_inv[i, j] = s
    return q, scale_inv


def _dequantize_blocks(q, scale_inv, block=128):
    out = torch.empty(q.shape)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            sl = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[sl] = q[sl].float() * scale_inv[i, j]
    return out


def _is_quantised_in_v3(name: str) -> bool:
    # published V3: every linear weight inside the decoder layers is FP8; norms, the router, embeddings and heads not
    return (name.startswith("model.layers.") and name.endswith("proj.weight") or "_proj_with_mqa" in name) \
        and "shared_head" not in name


def test_fp8_folder_loads_to_the_dequantised_weights(tmp_path):
    # dims that are not multiples of 128, so the last row/column of tiles is partial
    cfg = ns.ModelConfig.preset("tiny", hidden_size=160, q_lora_rank=136, kv_lora_rank=144, intermediate_size=200,
                                moe_intermediate_size=72)
    ours = _random_model(cfg)
    weights, scales, expected = {}, {}, {}
    for name, t in ours_to_hf(ours):
        t = t.detach().clone()
        if _is_quantised_in_v3(name):
            q, s = _quantize_blocks(t)
            weights[name], scales[name.replace(".weight", ".weight_scale_inv")] = q, s
            expected[name] = _dequantize_blocks(q, s)
        else:
            weights[name] = t
            expected[name] = t
    assert len(scales) > 20
    folder = tmp_path / "fp8"
    folder.mkdir()
    d = cfg.to_hf()
    d["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(d))
    # shard 1: all weights and half of the scales; shard 2: the other scales, away from their weights
    scale_names = sorted(scales)
    shard1 = {**weights, **{n: scales[n] for n in scale_names[::2]}}
    shard2 = {n: scales[n] for n in scale_names[1::2]}
    save_file(shard1, folder / "model-00001-of-00002.safetensors")
    save_file(shard2, folder / "model-00002-of-00002.safetensors")
    weight_map = {**dict.fromkeys(shard1, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(shard2, "model-00002-of-00002.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    model = ns.load(folder)
    assert model.cfg.quantization_config is None  # what we hold (and would save) is plain weights
    got, originals = dict(ours_to_hf(model)), dict(ours_to_hf(ours))
    for name, want in expected.items():
        assert torch.equal(got[name], want), name
    # FP8 rounding did change those weights, so loading them without their scales, or the float originals, fails
    assert sum(not torch.equal(expected[n], originals[n]) for n in weights if _is_quantised_in_v3(n)) > 20


def test_sharded_folder_loads_the_same_as_a_single_file(tmp_path):
    cfg = ns.ModelConfig.preset("tiny")
    ours = _random_model(cfg)
    ns.save(ours, tmp_path / "one")
    ns.save(ours, tmp_path / "many", max_shard_bytes=64 * 1024)
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "many" / "model.safetensors.index.json").exists()
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    a, b = ns.load(tmp_path / "one"), ns.load(tmp_path / "many")
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_load_in_bfloat16_keeps_the_routing_bias_in_float32(tmp_path):
    ours = _random_model(ns.ModelConfig.preset("tiny"))
    ns.save(ours, tmp_path / "out")
    model = ns.load(tmp_path / "out", dtype="bfloat16")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    bias = model.moe_layers()[0].gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, ours.moe_layers()[0].gate.e_score_correction_bias)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def saved(tmp_path) -> Path:
    ns.save(_random_model(ns.ModelConfig.preset("tiny")), tmp_path / "good")
    return tmp_path / "good"


def _drop(folder: Path, name: str):
    tensors = load_file(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
                                  "model.layers.2.eh_proj.weight", "lm_head.weight"])
def test_missing_tensor_is_named(saved, name):
    _drop(saved, name)
    with pytest.raises(CheckpointError) as e:
        ns.load(saved)
    assert name in str(e.value) and "model.safetensors" in str(e.value) and "missing" in str(e.value)


def test_shape_that_disagrees_with_config_is_named(saved):
    d = json.loads((saved / "config.json").read_text())
    d["kv_lora_rank"] = 40
    (saved / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.\d+\.self_attn\.\w+\.weight "
                                              r"has shape \([\d, ]+\) but config\.json implies"):
        ns.load(saved)


def test_unknown_model_type_is_refused(saved):
    d = json.loads((saved / "config.json").read_text())
    d["model_type"] = "mistral"  # llama, qwen2, qwen3 are read since issue 10
    (saved / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"config\.json.*model_type='mistral'"):
        ns.load(saved)


class _Canary:
    """Unpickling this creates a file: proof that a loader ran code from the weights."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("indexed", [False, True], ids=["bin-file", "index-pointing-to-bin"])
def test_pickled_weights_are_refused_without_unpickling(saved, tmp_path, indexed):
    canary = tmp_path / "pwned"
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Canary(canary)}))
    if indexed:
        (saved / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"model.embed_tokens.weight": "pytorch_model.bin"}}))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*not safetensors") as e:
        ns.load(saved)
    assert isinstance(e.value, UsageError)  # the CLI turns it into one `error:` line and exit code 2
    assert not canary.exists()


def test_corrupt_weight_file_is_named(saved):
    (saved / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        ns.load(saved)


def test_missing_config_or_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        ns.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        ns.load(tmp_path / "empty")


def test_saved_config_has_no_auto_map_pointing_at_missing_code(tmp_path):
    """Issue 10, 6b: a published config's auto_map names modeling files of its repository; written into a folder
    without them, transformers (trust_remote_code=True) fails with OSError and llama.cpp's converter crashes."""
    import transformers

    cfg = ns.ModelConfig.from_hf({**ns.ModelConfig.preset("tiny").to_hf(), "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}})
    ns.save(ns.Transformer(cfg.replace(num_nextn_predict_layers=0)), tmp_path / "out")
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "out", trust_remote_code=True)  # OSError before the fix
    assert type(hf).__name__ == "DeepseekV3Config"
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    # kept when the code it names is in the folder (saving over a published folder that ships it)
    for module in ("configuration_deepseek", "modeling_deepseek"):
        (tmp_path / "out" / f"{module}.py").write_text("# the repository's own code\n")
    ns.save(ns.Transformer(cfg.replace(num_nextn_predict_layers=0)), tmp_path / "out")
    assert "auto_map" in json.loads((tmp_path / "out" / "config.json").read_text())


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_v2_routing_without_bias_saves_no_routing_bias(tmp_path, topk_method):
    """Issue 10, 6c: V2's routing has no e_score_correction_bias; published V2 folders hold none, and an extra zero
    one is UNEXPECTED to transformers (and becomes a bogus exp_probs_b in llama.cpp's converter)."""
    import transformers

    cfg = ns.ModelConfig.preset("tiny", **{**V2_TINY, "topk_method": topk_method})
    ns.save(_random_model(cfg), tmp_path / "v2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "v2", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    with safe_open(tmp_path / "v2" / "model.safetensors", "pt") as f:
        assert not [n for n in f.keys() if "e_score_correction_bias" in n]
    ns.load(tmp_path / "v2")  # and it reads back without the bias
    # V3's noaux_tc routing uses it: still written
    ns.save(_random_model(ns.ModelConfig.preset("tiny")), tmp_path / "v3")
    with safe_open(tmp_path / "v3" / "model.safetensors", "pt") as f:
        assert [n for n in f.keys() if "e_score_correction_bias" in n]


def test_the_one_loader_names_a_missing_gguf_file(tmp_path):
    from nanoseek.checkpoint import load_model_and_tokenizer

    with pytest.raises(UsageError, match=r"GGUF file .*nothing\.gguf does not exist"):
        load_model_and_tokenizer(tmp_path / "nothing.gguf")


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _differing_tensors(a: Path, b: Path) -> set[str]:
    """Names whose tensors are not byte-identical (dtype, shape and every byte) between two folders, or in one
    only. Bytes, not values: -0.0 vs 0.0 or a rounding through another dtype would count."""
    ta, tb = _folder_tensors(a), _folder_tensors(b)
    return (set(ta) ^ set(tb)) | {n for n in set(ta) & set(tb)
                                  if ta[n].dtype != tb[n].dtype or ta[n].shape != tb[n].shape
                                  or not torch.equal(ta[n].contiguous().view(torch.uint8),
                                                     tb[n].contiguous().view(torch.uint8))}


def _hf_qwen2_folder(tmp_path: Path) -> Path:
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(cfg).float().eval()
    randomize_(model, 0, 0.3)
    model.save_pretrained(tmp_path / "hf-qwen2")
    return tmp_path / "hf-qwen2"


# Our model runs fused projections (MLP gate_up, MLA's q_a + kv_a, GQA's q/k/v, stacked experts) whose parts are
# the checkpoint's tensors: a folder transformers wrote loads and saves back with every tensor byte-identical.
FOLDERS = {
    "v3-q-lora-bias": lambda p: make_hf_checkpoint(p, "v3", attention_bias=True),
    "v3-bf16": lambda p: _to_bf16(make_hf_checkpoint(p, "v3")),
    "v2-no-q-lora": lambda p: make_hf_checkpoint(p, "v2", q_lora_rank=None, topk_method="group_limited_greedy",
                                                 scoring_func="softmax", experts_implementation="eager"),
    "qwen2-qkv-bias": _hf_qwen2_folder,
}


def _to_bf16(folder: Path) -> Path:
    """The folder in bf16 as DeepSeek publishes it: weights bf16, the routing bias float32."""
    tensors = {n: t if n.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
               for n, t in load_file(folder / "model.safetensors").items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    return folder


@pytest.mark.parametrize("kind", list(FOLDERS))
def test_transformers_folder_saves_back_byte_identical(tmp_path, kind):
    folder = FOLDERS[kind](tmp_path)
    model = ns.load(folder)
    ns.save(model, tmp_path / "back")
    assert _differing_tensors(folder, tmp_path / "back") == set()


def test_byte_identity_check_finds_one_changed_row_under_its_own_name(tmp_path):
    """Negative control of the test above: one row changed inside a fused parameter (the first row of
    kv_a_proj_with_mqa, stored after q_a_proj's rows in qkv_a_proj; the first row of up_proj, after gate_proj's
    in gate_up_proj) is reported, under exactly the checkpoint tensor that row belongs to."""
    folder = make_hf_checkpoint(tmp_path, "v3")
    model = ns.load(folder)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    with torch.no_grad():
        attn.qkv_a_proj.weight[model.cfg.q_lora_rank, 0] += 1.0
        mlp.gate_up_proj.weight[mlp.down_proj.in_features, 0] += 1.0
    ns.save(model, tmp_path / "back")
    assert _differing_tensors(folder, tmp_path / "back") == {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                                                             "model.layers.0.mlp.up_proj.weight"}
