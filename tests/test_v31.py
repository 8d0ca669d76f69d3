"""DeepSeek-V3.1 as published: UE8M0 FP8 folders load exactly, and the chat template's thinking switch works through
the API.

- UE8M0 (`quantization_config.scale_fmt: "ue8m0"`): every block scale is a power of two, so dequantising an e4m3
  weight is exact (a 4-bit significand times 2^k). Folders are made here from a random tiny V3 model: weights
  quantised to float8_e4m3fn with power-of-two block scales stored as float32 (as V3.1 publishes), as
  torch.float8_e8m0fnu, or as the raw exponent bytes (uint8, which transformers also reads as UE8M0). ns.load
  gives weight.float() * scale exactly, in float32 and in bfloat16, and the same tensors as transformers'
  FineGrainedFP8Config(dequantize=True). A scale that is not a power of two under ue8m0 is refused by name.
- Thinking: V3.1's template (tests/data, verbatim) thinks only when `thinking` is defined and true. The prompt the
  server gives the engine for a chat request equals transformers' apply_chat_template of the same messages with
  the V3 tokenizer and that template, for `thinking` unset / enabled / disabled (and its other spellings).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checkpoint import _is_quantised_in_v3, _random_model
from test_real_tokenizers import CHAT, CHAT_WITH_THINK, _folder
from test_server import KEY, MODEL, ServerThread

import nanoseek as ns
from nanoseek.checkpoint import CheckpointError, ours_to_hf
from nanoseek.serve.app import create_app
from nanoseek.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

FP8_MAX = 448.0     # largest finite float8_e4m3fn
BLOCK = 8           # 8 x 8 tiles (published: 128 x 128): every tiny weight holds many blocks, each with its own scale


# ------------------------------------------------------------------------------------------------- UE8M0 folders
def quantise_ue8m0(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weight and one power-of-two scale per tile: scale = 2^ceil(log2(amax / 448)), weight = w / scale."""
    r, c = w.shape
    tiles = w.reshape(r // block, block, c // block, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=2.0**-100)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (tiles / scale[:, None, :, None]).reshape(r, c).to(torch.float8_e4m3fn)
    return q, scale


def dequantise(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    r, c = q.shape
    return (q.float().reshape(r // block, block, c // block, block) * scale[:, None, :, None]).reshape(r, c)


def store(scale: torch.Tensor, as_: str) -> torch.Tensor:
    """A float32 power-of-two scale as a folder stores it."""
    if as_ == "float32":
        return scale
    if as_ == "float8_e8m0fnu":
        return scale.to(torch.float8_e8m0fnu)
    return (torch.frexp(scale).exponent - 1 + 127).to(torch.uint8)    # 2^e -> the byte e + 127


def ue8m0_folder(folder: Path, scales_as: str = "float32", scale_fmt: str = "ue8m0"):
    """A V3.1-style folder from a random tiny V3 model: (folder, {name: dequantised original}, the float model)."""
    cfg = ns.ModelConfig.preset("tiny", num_nextn_predict_layers=0)
    model = _random_model(cfg)
    tensors, expected = {}, {}
    for name, t in ours_to_hf(model):
        t = t.detach().clone()
        if _is_quantised_in_v3(name):
            q, scale = quantise_ue8m0(t)
            tensors[name], tensors[name.replace(".weight", ".weight_scale_inv")] = q, store(scale, scales_as)
            expected[name] = dequantise(q, scale)
        else:
            tensors[name] = expected[name] = t
    folder.mkdir()
    d = cfg.to_hf()
    d["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": scale_fmt, "weight_block_size": [BLOCK, BLOCK]}
    (folder / "config.json").write_text(json.dumps(d))
    save_file(tensors, folder / "model.safetensors")
    return folder, expected, model


def hf_dequantised(folder: Path):
    """transformers' own reading of the folder: FineGrainedFP8Config(dequantize=True), the CPU path."""
    qc = transformers.FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0", weight_block_size=(BLOCK, BLOCK))
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=qc)


def hf_names(sd: dict) -> dict[str, torch.Tensor]:
    """transformers' state dict with its stacked experts (gate_up_proj = [gate; up], down_proj) split into the
    checkpoint's per-expert names."""
    out = {}
    for name, t in sd.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            for e, gu in enumerate(t):
                gate, up = gu.chunk(2, dim=0)
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = up
        elif name.endswith("mlp.experts.down_proj"):
            for e, d in enumerate(t):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = d
        else:
            out[name] = t
    return out


@pytest.mark.parametrize("scales_as", ["float32", "float8_e8m0fnu", "uint8"])
def test_ue8m0_folder_loads_to_the_dequantised_weights_exactly(tmp_path, scales_as):
    folder, expected, original = ue8m0_folder(tmp_path / "v31", scales_as)
    quantised = [n for n in expected if _is_quantised_in_v3(n)]
    assert len(quantised) > 20
    model = ns.load(folder)
    got = dict(ours_to_hf(model))
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        assert torch.equal(got[name], want), name
    # FP8 did round those weights: the float originals (what a loader ignoring the scales' format could not tell
    # apart from a right answer on a coarser check) are not what the folder holds
    floats = dict(ours_to_hf(original))
    assert sum(not torch.equal(expected[n], floats[n]) for n in quantised) == len(quantised)
    # e4m3 (3 mantissa bits) times 2^k is a bfloat16 number (7): the bf16 load is exact too
    bf16 = dict(ours_to_hf(ns.load(folder, dtype="bfloat16")))
    for name in quantised:
        assert torch.equal(bf16[name].float(), expected[name]), name
    # transformers reads the same folder to the same tensors, and the same logits (float32 summation order: 1e-5)
    hf = hf_dequantised(folder)
    theirs = hf_names(hf.state_dict())
    for name, want in expected.items():
        assert torch.equal(theirs[name], want), name
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, hf_logits = model(ids), hf(ids).logits
    assert (ours_logits - hf_logits).abs().max() <= 1e-5 * hf_logits.abs().max()


def test_a_scale_that_is_not_a_power_of_two_is_refused_under_ue8m0(tmp_path):
    folder, _, _ = ue8m0_folder(tmp_path / "v31")
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    tensors[name][2, 3] *= 1.5                   # 2^k * 1.5: a float32 scale, not a UE8M0 one
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        ns.load(folder)
    msg = str(e.value)
    assert name in msg and "block (2, 3)" in msg and "not a power of two" in msg and "scale_fmt='ue8m0'" in msg
    # the same tensors declared as plain float32 scales (V3's format) load, with that scale applied
    d = json.loads((folder / "config.json").read_text())
    d["quantization_config"]["scale_fmt"] = "float"
    (folder / "config.json").write_text(json.dumps(d))
    w = dict(ours_to_hf(ns.load(folder)))["model.layers.1.self_attn.o_proj.weight"]
    q = tensors["model.layers.1.self_attn.o_proj.weight"]
    assert torch.equal(w, dequantise(q, tensors[name]))


def test_an_unknown_scale_format_is_refused(tmp_path):
    folder, _, _ = ue8m0_folder(tmp_path / "v31", scale_fmt="e5m2")
    with pytest.raises(CheckpointError, match="scale_fmt='e5m2'.*expected 'float'.*or 'ue8m0'"):
        ns.load(folder)


def test_v31_preset_is_v3s_architecture():
    v3, v31 = ns.ModelConfig.preset("v3"), ns.ModelConfig.preset("v3.1")
    assert v31 == v3 and v31.vocab_size == 129280 and v31.rope_scaling["factor"] == 40
    assert v31.num_params()["total"] == v3.num_params()["total"]


# ------------------------------------------------------------------------------------------------- thinking via the API
MESSAGES = {"chat": CHAT, "think_in_history": CHAT_WITH_THINK}
# (request fields, the template's `thinking` they mean; None: left undefined, the template's own default)
SWITCHES = {
    "unset": ({}, None),
    "enabled": ({"thinking": {"type": "enabled"}}, True),
    "disabled": ({"thinking": {"type": "disabled"}}, False),
    "true": ({"thinking": True}, True),
    "false": ({"thinking": False}, False),
    "template_kwargs_on": ({"chat_template_kwargs": {"thinking": True}}, True),
    "template_kwargs_off": ({"chat_template_kwargs": {"thinking": False}}, False),
    "deepseek-reasoner": ({"model": "deepseek-reasoner"}, True),
    "deepseek-chat": ({"model": "deepseek-chat"}, False),
}


class Recorder:
    """The real engine, noting each request's prompt ids."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def add_request(self, prompt, params=None, request_id=None):
        self.prompts.append(list(prompt))
        return self.engine.add_request(prompt, params, request_id=request_id)


@pytest.fixture(scope="module")
def v31(tmp_path_factory):
    """(our tokenizer, transformers' tokenizer) of V3's published tokenizer with V3.1's template."""
    folder = _folder("deepseek-v3.1", tmp_path_factory.getbasetemp())
    return Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)


def v31_server(tok: Tokenizer, **app_kw):
    torch.manual_seed(0)
    cfg = ns.ModelConfig.preset("tiny", vocab_size=129280, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                num_nextn_predict_layers=0)
    engine = Recorder(ns.Engine(ns.Transformer(cfg).eval(), tok, max_batch=4))
    srv = ServerThread(create_app(engine, tok, model_name=MODEL, api_key=KEY, **app_kw))
    srv.engine = engine
    return srv


@pytest.fixture(scope="module")
def server(v31):
    with v31_server(v31[0]) as s:      # no thinking_default: `nanoseek serve` without --thinking / --no-thinking
        yield s


def prompt_sent(srv, messages, fields: dict) -> list[int]:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    fields = dict(fields)
    client.chat.completions.create(model=fields.pop("model", MODEL), messages=messages, max_tokens=1,
                                   extra_body=fields or None)
    return srv.engine.prompts[-1]


def transformers_prompt(hf, messages, thinking: bool | None) -> str:
    kw = {} if thinking is None else {"thinking": thinking}
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("messages", MESSAGES)
def test_api_prompt_equals_transformers_v31_rendering(server, v31, switch, messages):
    tok, hf = v31
    fields, thinking = SWITCHES[switch]
    ids = prompt_sent(server, MESSAGES[messages], fields)
    text = transformers_prompt(hf, MESSAGES[messages], thinking)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    # V3.1 thinks only when asked: "<think>" opens the answer, else "</think>" closes an empty thought
    assert tok.decode(ids).endswith("<｜Assistant｜><think>" if thinking else "<｜Assistant｜></think>")


def test_a_server_default_applies_when_the_request_is_silent_and_a_request_wins(v31):
    # --thinking (thinking_default=True) turns V3.1's thinking on for requests that do not say; this is also what
    # every server did before the default became the template's, which is why "unset" above failed then
    tok, hf = v31
    with v31_server(tok, thinking_default=True) as srv:
        ids = prompt_sent(srv, CHAT, {})
        assert ids == hf(transformers_prompt(hf, CHAT, True), add_special_tokens=False)["input_ids"]
        assert ids != hf(transformers_prompt(hf, CHAT, None), add_special_tokens=False)["input_ids"]
        off = prompt_sent(srv, CHAT, {"thinking": {"type": "disabled"}})
        assert off == hf(transformers_prompt(hf, CHAT, False), add_special_tokens=False)["input_ids"]
