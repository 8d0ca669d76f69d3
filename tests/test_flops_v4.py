"""DeepSeek-V4's training FLOPs per token (flops.py) against torch's own count of the matmuls our forward runs.

The oracle is torch.utils.flop_counter.FlopCounterMode on the forward of tiny-v4 (and v4-tiny's MTP depth), with
model/v4.attend replaced by a function that does no matmul: the full path scores every key under a mask, where
flops.py counts the keys a query attends (window + its layer type's entries), so that part is counted by hand here.
Everything else (projections incl. the grouped output, compressors, indexer queries and scores, mHC mappings and
mixes, hash and learned gates, k routed + shared experts, hc_head, head, MTP's e/h projections) is torch's count.
Training is 3x the forward (PaLM appendix B). Exact: both count whole multiply-adds of the same shapes.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nanoseek.model.v4 as v4
from nanoseek.config import ModelConfig
from nanoseek.flops import flops_per_token
from nanoseek.model.transformer import Transformer

T, B = 64, 2        # a multiple of every compress rate (4, 8): no tail left out of a compressor


def no_attention(q, kv, allowed, sinks, picked=None):
    return q.transpose(1, 2)            # (B, T, H, d), no matmul: the attention is counted by hand


def counted(fn) -> int:
    """torch's count of fn's forward with gradients on: the training path (without gradients the routed experts run
    as grouped matmuls, ClampedExperts.sorted_forward, which FlopCounterMode does not see)."""
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def attention_by_hand(cfg, T, kinds) -> int:
    """Per token, forward: scores and weighted sums (2 x 2 x heads x head_dim per key) over the keys a query at
    the sequence end attends: its window, every HCA entry, index_topk CSA entries."""
    per_key, total = 4 * cfg.num_attention_heads * cfg.head_dim, 0
    for kind in kinds:
        keys = min(cfg.sliding_window, T)
        if kind == "heavily_compressed_attention":
            keys += T // cfg.compress_rates[kind]
        elif kind == "compressed_sparse_attention":
            keys += min(cfg.index_topk, T // cfg.compress_rates[kind])
        total += per_key * keys
    return total


@pytest.fixture
def ids():
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(0))


def test_v4_training_flops_equal_three_forwards_counted_by_torch(monkeypatch, ids):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny-v4")
    model = Transformer(cfg).eval()
    monkeypatch.setattr(v4, "attend", no_attention)
    forward = counted(lambda: model(ids)) / (B * T) + attention_by_hand(cfg, T, cfg.layer_types)
    assert flops_per_token(cfg, T, mtp=False) == 3 * forward
    assert flops_per_token(cfg, T) == 3 * forward                       # tiny-v4 has no MTP


def test_v4_mtp_depth_flops_equal_torchs_count(monkeypatch, ids):
    """v4-tiny's MTP depth runs on T - 1 positions: what Transformer.losses counts beyond the main forward."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("v4-tiny")
    model = Transformer(cfg).eval()
    monkeypatch.setattr(v4, "attend", no_attention)
    main = counted(lambda: model(ids))
    both = counted(lambda: model.losses(ids, ids))
    depth = (both - main) / (B * (T - 1)) + attention_by_hand(cfg, T - 1, ["sliding_attention"])
    assert flops_per_token(cfg, T) - flops_per_token(cfg, T, mtp=False) == 3 * depth


def test_the_count_follows_the_sequence_and_can_fail(monkeypatch, ids):
    """Longer sequences cost more per token only through HCA's entries and CSA's indexer (the window and top-k are
    capped), and a count that leaves out the mHC mixes is caught by the oracle."""
    cfg = ModelConfig.preset("tiny-v4")
    grow = flops_per_token(cfg, 2 * T, mtp=False) - flops_per_token(cfg, T, mtp=False)
    hca, csa = cfg.layer_types.count("heavily_compressed_attention"), cfg.layer_types.count("compressed_sparse_attention")
    extra_entries = hca * (T // 8) * 4 * cfg.num_attention_heads * cfg.head_dim \
        + csa * (T // 4) * 2 * cfg.index_n_heads * cfg.index_head_dim
    assert grow == 3 * extra_entries
    model = Transformer(cfg).eval()
    monkeypatch.setattr(v4, "attend", no_attention)
    monkeypatch.setattr(v4, "mix", lambda streams, post, comb, y: streams + y.unsqueeze(-2))   # no comb @ streams
    forward = counted(lambda: model(ids)) / (B * T) + attention_by_hand(cfg, T, cfg.layer_types)
    assert flops_per_token(cfg, T, mtp=False) != 3 * forward
