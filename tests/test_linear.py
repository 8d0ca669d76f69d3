"""The projection's inference paths (model/layers.py Linear, decode_layout): oneDNN's product and the (in, out)
weight layout give nn.Linear's outputs, in training and in inference, and the checkpoint is unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

import nanoseek as ns
from nanoseek.model import gemv, layers
from nanoseek.model.layers import Linear, decode_layout


@pytest.fixture
def small_threshold(monkeypatch):
    """Route even the test's small weights through the library's fast paths (oneDNN, MKL over (in, out)); the
    one-row kernel, which decode_layout builds where a compiler is, is off here (tests/test_gemv.py has it)."""
    monkeypatch.setattr(layers, "ONEDNN_MIN_WEIGHT", 1)
    monkeypatch.setattr(gemv, "_state", {"error": "off for this test"})


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_inference_paths_equal_f_linear(small_threshold, rows, bias):
    torch.manual_seed(0)
    lin = Linear(48, 160, bias=bias)
    x = torch.randn(rows, 3, 48) if rows > 1 else torch.randn(1, 1, 48)
    ref = F.linear(x, lin.weight, lin.bias)
    with torch.inference_mode():
        plain = lin(x)                                    # oneDNN over the (out, in) weight
        assert decode_layout(lin) == 1 and lin.weight.stride() == (1, 160)
        moved = lin(x)                                    # MKL (one row) or oneDNN over the (in, out) weight
    assert plain.shape == moved.shape == ref.shape
    assert rel_err(plain, ref) < 1e-6 and rel_err(moved, ref) < 1e-6
    # negative control: the same weight read in the wrong order is caught by the comparison
    assert rel_err(F.linear(x, lin.weight.contiguous().view(48, 160).t(), lin.bias), ref) > 0.1


def test_training_path_and_gradients_unchanged(small_threshold):
    torch.manual_seed(0)
    lin, ref = Linear(32, 64), torch.nn.Linear(32, 64)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(4, 32)
    lin(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert torch.equal(lin.weight.grad, ref.weight.grad) and torch.equal(lin.bias.grad, ref.bias.grad)


def test_decode_layout_keeps_the_model_and_its_checkpoint(small_threshold, tmp_path):
    cfg = ns.ModelConfig.preset("tiny-qwen2")
    torch.manual_seed(0)
    model = ns.Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        before = model(ids)
    ns.save(model, tmp_path / "a")
    assert decode_layout(model) > 0
    assert model.lm_head.weight is model.embed_tokens.weight or not cfg.tie_word_embeddings
    with torch.no_grad():
        after = model(ids)
    assert rel_err(after, before) < 1e-5
    ns.save(model, tmp_path / "b")
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
