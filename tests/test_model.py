"""The model core against its specification: transformers' DeepSeek-V2/V3 as the reference, and our own two paths
(full vs absorbed attention, grouped vs per-token experts) against each other.

Tolerances: float32 has a 1.2e-7 unit roundoff; the same maths summed in another order over a few layers of
64-wide reductions lands around 1e-6 relative, so the acceptance bound of 1e-5 relative max error leaves a
margin of ~10x while still catching any real difference (a wrong rope layout, routing rule or scale moves the
logits by 1e-2 or more: test_reference_comparison_can_fail checks exactly that).
"""

from __future__ import annotations

import resource

import pytest
import torch
import torch.nn.functional as F
from conftest import YARN, make_hf_model, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

import nanoseek as ns
from nanoseek.infer.cache import LatentCache
from nanoseek.model import moe as moe_mod
from nanoseek.model.moe import Experts, Gate

TOL = 1e-5

# (kind, overrides of the tiny base config in conftest.TINY_HF); every acceptance feature appears at least once.
CASES = {
    # V3 as published: q_lora, YaRN with interleaved rope pairs, sigmoid noaux_tc with a non-zero bias, 1 dense layer
    "v3-qlora-yarn-interleave-noaux_tc": ("v3", dict(rope=YARN)),
    # V3 without q_lora (a single q_proj), YaRN with half-split rope pairs
    "v3-no-qlora-yarn-half-split": ("v3", dict(q_lora_rank=None, rope_interleave=False, rope=YARN)),
    # every layer MoE, plain rope, v_head_dim (32) > qk_head_dim (24), 2 groups of 4 experts
    "v3-all-moe-plain-rope-wide-v": ("v3", dict(first_k_dense_replace=0, v_head_dim=32, n_group=2, topk_group=1)),
    # one routed expert per token: its weight is normalised to 1 (norm_topk_prob) before routed_scaling_factor
    "v3-top1-two-shared": ("v3", dict(num_experts_per_tok=1, n_shared_experts=2, n_group=1, topk_group=1)),
    # odd sizes: rope slices at odd offsets (complex views need a copy), expert rows not 16-byte aligned (the
    # per-expert fallback instead of grouped_mm, which transformers' own default cannot do: it runs eager here)
    "v3-odd-sizes": ("v3", dict(qk_nope_head_dim=15, kv_lora_rank=31, v_head_dim=17, moe_intermediate_size=30,
                                rope=YARN, experts_implementation="eager")),
    # V2-Lite shape: no q_lora, softmax greedy, YaRN with V2's mscale 0.707, no top-k normalisation
    "v2-greedy-no-qlora-yarn": ("v2", dict(q_lora_rank=None, topk_method="greedy",
                                           rope={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
    # V2 shape: q_lora, softmax group_limited_greedy, 2 dense layers first, scaling 4
    "v2-group-limited-greedy": ("v2", dict(topk_method="group_limited_greedy", first_k_dense_replace=2,
                                           routed_scaling_factor=4.0)),
}


def _ids(B=2, T=24, vocab=128, seed=1):
    # T = 24 > original_max_position_embeddings = 16 of conftest.YARN, so the interpolated frequencies are used
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _load_reference(tmp_path, kind, cfg):
    ref = make_hf_model(kind, **cfg)
    ref.save_pretrained(tmp_path / "ref")
    return ref, ns.load(tmp_path / "ref")


@pytest.mark.parametrize("kind,cfg", CASES.values(), ids=CASES.keys())
def test_logits_match_transformers(tmp_path, kind, cfg):
    ref, ours = _load_reference(tmp_path, kind, cfg)
    ids = _ids()
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids)
    assert got.shape == want.shape == (2, 24, 128)
    assert rel_err(got, want) < TOL


def test_reference_comparison_can_fail(tmp_path):
    """Each feature the comparison claims to cover changes the logits far beyond TOL when done differently, so
    test_logits_match_transformers would notice a wrong rope layout, a missing YaRN, a dropped routing bias or a
    different selection rule."""
    ref, ours = _load_reference(tmp_path, "v3", dict(rope=YARN))
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
    cfg = ours.cfg
    variants = {
        "half-split rope": cfg.replace(rope_interleave=False),
        "no yarn": cfg.replace(rope_scaling=None),
        "greedy selection": cfg.replace(topk_method="greedy"),
        "softmax scores": cfg.replace(scoring_func="softmax"),
    }
    for what, vcfg in variants.items():
        other = ns.Transformer(vcfg)
        other.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert rel_err(other.eval()(ids), want) > 1e-3, what
    with torch.no_grad():
        for m in ours.moe_layers():
            m.gate.e_score_correction_bias.zero_()
        assert rel_err(ours(ids), want) > 1e-3, "zero routing bias"


def _random_model(cfg, seed=0, scale=0.2):
    torch.manual_seed(seed)
    model = ns.Transformer(cfg)
    model.init_weights(std=scale)
    with torch.no_grad():
        for m in model.moe_layers() + [b.block.mlp for b in model.mtp]:
            m.gate.e_score_correction_bias.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("chunks", [[1] * 20, [7, 1, 5, 7]], ids=["token-by-token", "chunks"])
def test_absorbed_attention_matches_full_attention(chunks):
    """Decoding through LatentCache (absorbed MLA: attention against the cached latent) gives the logits of one
    full-attention forward over the whole sequence, whether fed one token at a time or in chunks."""
    cfg = ns.ModelConfig.preset("tiny", rope_scaling=dict(YARN, type="yarn"))
    model = _random_model(cfg)
    ids = _ids(B=2, T=20, vocab=cfg.vocab_size)
    with torch.no_grad():
        full = model(ids)
        cache = LatentCache(cfg, batch=2, max_len=20)
        outs, start = [], 0
        for n in chunks:
            pos = torch.arange(start, start + n).expand(2, n)
            outs.append(model(ids[:, start:start + n], positions=pos, cache=cache))
            cache.advance()
            start += n
    assert cache.length == 20
    assert rel_err(torch.cat(outs, dim=1), full) < TOL


def test_absorbed_path_stores_only_the_latent():
    assert ns.LatentCache is LatentCache   # the public name resolves to its home, nanoseek.infer.cache
    cfg = ns.ModelConfig.preset("tiny")
    cache = LatentCache(cfg, batch=1, max_len=8)
    per_token = (cache.c_kv[0, 0, 0].numel() + cache.k_pe[0, 0, 0].numel())
    assert per_token == cfg.kv_cache_elems_per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim


def _naive_experts(experts: Experts, x, weights, idx):
    """Per token, per chosen expert: sum_j g_j * down_j(silu(gate_j x) * up_j x). The definition, not fast."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[n, j]
            gate, up = experts.gate_up_proj[e].chunk(2)                                # [W_gate; W_up]
            h = F.silu(gate @ x[n]) * (up @ x[n])
            out[n] += weights[n, j] * (experts.down_proj[e] @ h)
    return out


def _experts_case(N=40):
    cfg = ns.ModelConfig.preset("tiny")
    torch.manual_seed(0)
    experts, gate = Experts(cfg), Gate(cfg)
    for p in list(experts.parameters()) + list(gate.parameters()):
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(N, cfg.hidden_size)
    weights, idx, _ = gate(x)
    return experts, x, weights, idx


def _routed_experts_path(monkeypatch, path: str):
    """Force one of the three ways Experts.forward computes the same thing (dense: every expert on every token)."""
    monkeypatch.setattr(moe_mod, "DENSE_EXPERTS_MAX_MACS", float("inf") if path == "dense" else 0)
    if path in ("padded-bmm", "per-expert-fallback"):
        monkeypatch.setattr(moe_mod, "_grouped_mm_ok", lambda x, w: False)
    if path == "per-expert-fallback":
        monkeypatch.setattr(moe_mod, "PADDED_MAX_ROWS_RATIO", 0)
    if path == "padded-bmm":
        monkeypatch.setattr(moe_mod, "PADDED_MAX_ROWS_RATIO", float("inf"))


PATHS = ["grouped_mm", "padded-bmm", "per-expert-fallback", "dense"]


@pytest.mark.parametrize("path", PATHS)
def test_routed_experts_match_per_token_reference(monkeypatch, path):
    _routed_experts_path(monkeypatch, path)
    experts, x, weights, idx = _experts_case()
    x.requires_grad_(True)
    got = experts(x, weights, idx)
    want = _naive_experts(experts, x, weights, idx)
    assert rel_err(got, want) < TOL
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [x, experts.gate_up_proj, experts.down_proj], g)
    ref = torch.autograd.grad(want, [x, experts.gate_up_proj, experts.down_proj], g)
    for a, b in zip(grads, ref):
        assert rel_err(a, b) < TOL


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", PATHS)
def test_routed_experts_are_batched_not_per_token(monkeypatch, path):
    """The number of tensor operations does not grow with the number of tokens (no Python loop over tokens)."""
    _routed_experts_path(monkeypatch, path)
    counts = []
    for N in (16, 256):
        experts, x, weights, idx = _experts_case(N)
        idx = torch.arange(N * idx.shape[1]).view(N, -1) % experts.down_proj.shape[0]  # every expert gets tokens
        with torch.no_grad(), _CountOps() as c:
            experts(x, weights, idx)
        counts.append(c.n)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("path", ["grouped_mm", "padded-bmm"])
def test_grouped_experts_issue_no_per_expert_ops(monkeypatch, path):
    """The grouped paths run every expert in the same operations: their op count does not grow with the number of
    experts (the per-expert fallback's does: the negative control)."""
    def ops(E: int) -> int:
        cfg = ns.ModelConfig.preset("tiny", n_routed_experts=E, n_group=1, topk_group=1)
        experts, gate = Experts(cfg), Gate(cfg)
        for p in list(experts.parameters()) + list(gate.parameters()):
            torch.nn.init.normal_(p, std=0.3)
        x = torch.randn(64, cfg.hidden_size)
        weights, _, _ = gate(x)
        idx = torch.arange(64 * weights.shape[1]).view(64, -1) % E           # every expert gets the same rows
        with torch.no_grad(), _CountOps() as c:
            experts(x, weights, idx)
        return c.n

    _routed_experts_path(monkeypatch, path)
    assert ops(4) == ops(16)
    _routed_experts_path(monkeypatch, "per-expert-fallback")
    assert ops(4) < ops(16)


def test_mtp_loss_predicts_the_token_after_next():
    """MTP depth 0 at position i sees h_i and the embedding of t_{i+1} and is scored against t_{i+2}."""
    cfg = ns.ModelConfig.preset("tiny")
    model = _random_model(cfg)
    seq = _ids(B=2, T=17, vocab=cfg.vocab_size)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[0, 3] = -100                      # an ignored target (t_4 of sequence 0) is ignored by the MTP loss too
    after_next = seq[:, 2:].clone()           # MTP target at position i: t_{i+2}
    after_next[0, 2] = -100                   # ... which for i = 2 is that same ignored t_4
    with torch.no_grad():
        out = model.losses(inputs, targets)
        logits, h = model(inputs, return_hidden=True)
        T = inputs.shape[1] - 1               # the last position has no t_{i+2}
        mtp_logits, _ = model.mtp_forward(h[:, :T], seq[:, 1:T + 1])
        V = cfg.vocab_size
        want_mtp = F.cross_entropy(mtp_logits.reshape(-1, V), after_next.reshape(-1))
        want_main = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
        # scored against t_{i+1} instead (a shift by one), the same logits give a clearly different loss
        off_by_one = F.cross_entropy(mtp_logits.reshape(-1, V), seq[:, 1:T + 1].reshape(-1))
    assert torch.allclose(out["loss"], want_main, rtol=1e-6)
    assert torch.allclose(out["mtp_loss"], want_mtp, rtol=1e-6)
    assert abs(out["mtp_loss"] - off_by_one) > 1e-2


def test_losses_train_every_part():
    """losses() in training mode: finite scalars, a positive balance loss, and gradients reach the main model,
    the MTP module and the experts."""
    cfg = ns.ModelConfig.preset("tiny")
    model = _random_model(cfg).train()
    seq = _ids(B=2, T=17, vocab=cfg.vocab_size)
    out = model.losses(seq[:, :-1], seq[:, 1:])
    assert set(out) == {"loss", "mtp_loss", "balance_loss"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert out["balance_loss"] > 0
    (out["loss"] + 0.3 * out["mtp_loss"] + out["balance_loss"]).backward()
    for name in ("mtp.0.eh_proj.weight", "mtp.0.block.mlp.experts.gate_up_proj", "layers.1.mlp.experts.down_proj",
                 "layers.1.mlp.gate.weight", "embed_tokens.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    loads = [m.load for m in model.moe_layers()]
    assert all(int(ld.sum()) == 2 * 16 * cfg.num_experts_per_tok for ld in loads)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_v3_preset_builds_on_meta_device_without_allocating():
    cfg = ns.ModelConfig.preset("v3")
    before = _rss_bytes()
    with torch.device("meta"):
        model = ns.Transformer(cfg)
    grown = _rss_bytes() - before
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_meta for t in tensors)
    assert grown < 200 * 2**20  # Python objects only; the weights alone would be 2.7 TB in float32
    # the module's own shapes agree with the closed-form count (the routing bias is a buffer, not a parameter)
    main = sum(t.numel() for n, t in model.named_parameters() if not n.startswith("mtp."))
    main += sum(t.numel() for n, t in model.named_buffers() if n.endswith("e_score_correction_bias")
                and not n.startswith("mtp."))
    assert main == cfg.num_params()["total"]
    with_mtp = sum(t.numel() for t in model.parameters()) + sum(
        t.numel() for n, t in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert with_mtp == cfg.num_params(include_mtp=True)["total"]


@pytest.mark.parametrize("preset,total,activated", [("v3", 671e9, 37e9), ("v2", 236e9, 21e9),
                                                    ("v2-lite", 15.7e9, 2.4e9)])
def test_num_params_match_published_sizes(preset, total, activated):
    """DeepSeek-V3 report: 671B total, 37B activated per token (MTP excluded); V2 report: 236B / 21B, and
    15.7B / 2.4B for V2-Lite. Published figures are rounded, hence 1% (total) and 3% (activated)."""
    n = ns.ModelConfig.preset(preset).num_params()
    assert abs(n["total"] - total) / total < 0.01
    assert abs(n["activated"] - activated) / activated < 0.03
