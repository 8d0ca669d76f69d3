"""Shared test helpers.

`make_hf_checkpoint(tmp_path, kind="v3", **cfg)` writes a random tiny DeepSeek checkpoint folder with transformers'
own classes (DeepseekV3ForCausalLM / DeepseekV2ForCausalLM, `save_pretrained`), so a test can load it with
`ns.load` and compare against the reference model:

    from conftest import make_hf_checkpoint, make_hf_model
    folder = make_hf_checkpoint(tmp_path, kind="v2", q_lora_rank=None, topk_method="greedy")
    model = ns.load(folder)

`make_hf_model(kind, **cfg)` returns the transformers model itself (eval mode, float32) without saving it.
Keyword arguments override the fields of the tiny base config below (any DeepseekV3Config / DeepseekV2Config
field); `rope={...}` gives YaRN values (rope_type "yarn" is implied), `seed` and `scale` control the random
weights. The weights are drawn large on purpose (std `scale`, norms in [0.5, 1.5], a non-zero V3 routing bias),
so routing and rotary choices change the logits: a test comparing against these references can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Test models are tiny: a second intra-op thread gains nothing, and on a shared, oversubscribed machine OpenMP
# threads waiting on each other at barriers made a 14 ms forward take 3 s. One thread keeps tests fast and steady.
torch.set_num_threads(1)

# Small enough that a forward takes milliseconds; every feature is on: q_lora, 8 experts in 4 groups, one dense
# layer first, v_head_dim != qk_head_dim (16 + 8), shared expert.
TINY_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=20, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
               n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=1.5,
               max_position_embeddings=256)

YARN = dict(factor=4.0, original_max_position_embeddings=16, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.8)


def randomize_(model, seed: int = 0, scale: float = 0.3, vector_std: float = 1.0) -> torch.Generator:
    """Weights drawn large so that rope, norms, biases, masks and cache slots matter in a comparison: matrices
    Normal(0, scale), other vectors Normal(0, vector_std), norm weights Uniform(0.5, 1.5). Returns the generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=g)
            else:
                p.normal_(0.0, scale if p.dim() > 1 else vector_std, generator=g)
    return g


def make_hf_model(kind: str = "v3", seed: int = 0, scale: float = 0.3, rope: dict | None = None,
                  experts_implementation: str | None = None, **cfg):
    """A random transformers DeepSeek model (eval, float32). kind: "v3" or "v2". experts_implementation="eager"
    for sizes transformers' default grouped_mm path cannot take on CPU (rows not 16-byte aligned)."""
    import transformers

    if kind not in ("v3", "v2"):
        raise ValueError(f"kind must be 'v3' or 'v2', not {kind!r}")
    kw = {**TINY_HF, **cfg}
    if kind == "v3":  # DeepseekV3Config declares one MTP layer by default, which transformers never builds
        kw.setdefault("num_nextn_predict_layers", 0)
    rope_theta = kw.pop("rope_theta", 10000.0)
    kw["rope_parameters"] = ({"rope_type": "yarn", "rope_theta": rope_theta, **rope} if rope
                             else {"rope_type": "default", "rope_theta": rope_theta})
    if kind == "v3":
        config_cls, model_cls = transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM
    else:
        config_cls, model_cls = transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM
    model = model_cls(config_cls(**kw)).float().eval()
    if experts_implementation:
        model.set_experts_implementation(experts_implementation)
    g = randomize_(model, seed, scale)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # steers selection only; must be non-zero to be tested
                b.normal_(0.0, 0.5, generator=g)
    return model


def make_hf_checkpoint(tmp_path, kind: str = "v3", seed: int = 0, scale: float = 0.3, rope: dict | None = None,
                       name: str | None = None, **cfg) -> Path:
    """Write a random tiny transformers DeepSeek checkpoint under tmp_path and return the folder.

    The folder holds what `save_pretrained` writes (config.json, model.safetensors with per-expert tensor names,
    generation_config.json). Other tests (engine, server, training) reuse it as a "published" model.
    """
    model = make_hf_model(kind, seed=seed, scale=scale, rope=rope, **cfg)
    folder = Path(tmp_path) / (name or f"hf-{kind}-{seed}")
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Fixture form: `hf_checkpoint(kind="v2", **cfg)` -> folder (see make_hf_checkpoint)."""
    return lambda kind="v3", **cfg: make_hf_checkpoint(tmp_path, kind, **cfg)


def v4_pair(**overrides):
    """(transformers' DeepseekV4ForCausalLM, ours) with the same random weights, from the tiny-v4 preset with
    overrides, both float32 in eval mode. Weights std 0.3 for vectors, 0.15 for matrices (not 0.02: the attention,
    sinks, stream mixing and routing all move the logits), a random hash table and routing bias."""
    import transformers

    from nanoseek.config import ModelConfig
    from nanoseek.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny-v4", **overrides)
    kw = {k: v for k, v in cfg.to_hf().items() if k != "architectures"}
    hf = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**kw)).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3 if p.dim() < 2 else 0.15)
        for m in hf.modules():
            if hasattr(m, "tid2eid"):
                m.tid2eid.copy_(torch.rand(cfg.vocab_size, cfg.n_routed_experts).argsort(-1)[:, :cfg.num_experts_per_tok])
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0.0, 0.3)
    ours = Transformer(cfg).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=True)
    return hf, ours


def metrics_rows(out) -> list[dict]:
    """A run's metrics.jsonl (OUT/metrics.jsonl), one dict per line."""
    import json
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def corpus_tokenizer_dir(tmp_path_factory) -> str:
    """A 512-token BPE tokenizer trained once on the embedded corpus (what pretrain would train itself)."""
    from nanoseek.data.tasks import corpus_documents
    from nanoseek.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    Tokenizer.train(list(corpus_documents(400, seed=0)), 512, progress=False).save(d)
    return str(d)


def require_cpu_kernel(module, what: str) -> None:
    """module.load() (a C++ CPU kernel: cpu_attention, cpu_cross_entropy), else skip where it cannot run (no AVX-512
    F/BW/VL, no C++ compiler) and fail where it should: a failed build on a machine that can build it is a defect."""
    import os
    import shutil
    if module.load():
        return
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl")) and shutil.which("c++"):
        pytest.fail(f"the {what} did not build on an AVX-512 machine: {module._state.get('error')}")
    pytest.skip(f"the {what} does not run here: {module._state.get('error')}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error the acceptance tests bound."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(autouse=True, scope="session")
def _no_real_data_dir(tmp_path_factory):
    """Tests never write the user's own files: `nanoseek serve` keeps its chat history under $XDG_DATA_HOME by
    default (history.default_path), so every test, and every process a test starts, gets a temporary one."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
    yield
    mp.undo()
