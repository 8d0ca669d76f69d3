"""Packed training rows (SFT): several documents share a row, each attending only to itself.

The specification: the loss of a packed batch on the full attention path, with the per-document mask
(`Transformer.losses(..., documents=)`), equals the loss of the same documents run one by one, unpacked (main loss and
MTP loss). Tolerance 1e-5 relative, float32: the same maths summed in another order (other matmul shapes, other
expert kernels for 60 tokens than for 5) lands around 1e-7..1e-6; a document seeing its neighbour moves the loss by
1e-2 or more, which the negative control checks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

import nanoseek as ns
from nanoseek.model import document_mask

IGNORE = -100
TOL = 1e-5
# three rows of 20 tokens: documents of different lengths, then padding (row 2 is one document and 13 pad tokens)
ROWS, SEQ = [[5, 9, 3], [12, 4], [7]], 20


def _model():
    # every part that packing could break: MoE layers (routing per token), two MTP depths (labels that would cross a
    # document boundary), v_head_dim 16 != qk_head_dim 24 (the padded-v SDPA call), q_lora
    cfg = ns.ModelConfig.preset("tiny", num_nextn_predict_layers=2)
    torch.manual_seed(0)
    model = ns.Transformer(cfg)
    model.init_weights(std=0.2)
    with torch.no_grad():
        for m in model.moe_layers() + [b.block.mlp for b in model.mtp]:
            m.gate.e_score_correction_bias.normal_(0, 0.3)
    return model.eval()


def _documents(vocab: int):
    """Per document: ids (L,) and next-token targets (L,) with the last one and a few 'prompt' tokens ignored."""
    g = torch.Generator().manual_seed(1)
    docs = []
    for row in ROWS:
        for L in row:
            ids = torch.randint(0, vocab, (L,), generator=g)
            tgt = torch.full((L,), IGNORE)
            tgt[:-1] = ids[1:]
            tgt[: L // 3] = IGNORE                                   # an untrained prompt, as SFT has
            docs.append((ids, tgt))
    return docs


def _pack(docs):
    """The documents laid into ROWS -> ids, targets, positions (restarting at 0), documents (-1 = padding)."""
    B = len(ROWS)
    ids = torch.zeros(B, SEQ, dtype=torch.long)
    tgt = torch.full((B, SEQ), IGNORE)
    pos = torch.zeros(B, SEQ, dtype=torch.long)
    seg = torch.full((B, SEQ), -1)
    it = iter(docs)
    for r, row in enumerate(ROWS):
        col = 0
        for s, L in enumerate(row):
            x, t = next(it)
            ids[r, col:col + L], tgt[r, col:col + L] = x, t
            pos[r, col:col + L], seg[r, col:col + L] = torch.arange(L), s
            col += L
    return ids, tgt, pos, seg


def _unpacked_losses(model, docs):
    """The reference: each document alone (plain causal forward, positions 0..L-1); cross-entropy summed over every
    document's trained tokens, divided by their count (per MTP depth, then the mean over depths)."""
    n_depth = len(model.mtp)
    main, mtp = torch.zeros(2), torch.zeros(n_depth, 2)        # (sum, count)
    for ids, tgt in docs:
        logits, h = model(ids[None], return_hidden=True)
        main += torch.stack([F.cross_entropy(logits[0], tgt, ignore_index=IGNORE, reduction="sum"),
                             (tgt != IGNORE).sum()])
        for k in range(n_depth):                                  # depth k at i: input t_{i+k+1}, label targets[i+k+1]
            T = len(ids) - (k + 1)
            if T <= 0:
                break
            logits, h = model.mtp_forward(h[:, :T], ids[None, k + 1:k + 1 + T], depth=k)
            labels = tgt[k + 1:k + 1 + T]
            mtp[k] += torch.stack([F.cross_entropy(logits[0], labels, ignore_index=IGNORE, reduction="sum"),
                                   (labels != IGNORE).sum()])
    return main[0] / main[1], (mtp[:, 0] / mtp[:, 1]).mean()


def test_packed_loss_equals_per_document_loss():
    model = _model()
    docs = _documents(model.cfg.vocab_size)
    ids, tgt, pos, seg = _pack(docs)
    with torch.no_grad():
        got = model.losses(ids, tgt, positions=pos, documents=seg, ignore_index=IGNORE)
        want_main, want_mtp = _unpacked_losses(model, docs)
        # negative control: the same packed rows without the document mask (causal over the whole row)
        leaky = model.losses(ids, tgt, positions=pos, ignore_index=IGNORE)
    assert rel_err(got["loss"], want_main) < TOL
    assert rel_err(got["mtp_loss"], want_mtp) < TOL
    assert rel_err(leaky["loss"], want_main) > 100 * TOL
    assert rel_err(leaky["mtp_loss"], want_mtp) > 100 * TOL


def test_packed_gradients_equal_per_document_gradients():
    """What training uses: d(loss + mtp_loss)/d(weights) of the packed batch equals that of the documents one by one."""
    model = _model()
    docs = _documents(model.cfg.vocab_size)
    ids, tgt, pos, seg = _pack(docs)
    params = [p for n, p in model.named_parameters() if n.startswith(("embed_tokens", "layers.1", "mtp.1"))]
    out = model.losses(ids, tgt, positions=pos, documents=seg, ignore_index=IGNORE)
    got = torch.autograd.grad(out["loss"] + out["mtp_loss"], params)
    want = torch.autograd.grad(sum(_unpacked_losses(model, docs)), params)
    for p, a, b in zip(params, got, want):
        assert b.abs().sum() > 0 and rel_err(a, b) < TOL, p.shape


def test_document_mask_is_block_diagonal_causal_and_pads_see_themselves():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1, -1]])
    m = document_mask(seg)
    assert m.shape == (1, 1, 7, 7) and m.dtype == torch.bool
    want = torch.zeros(7, 7, dtype=torch.bool)
    want[:2, :2] = torch.ones(2, 2).tril().bool()
    want[2:5, 2:5] = torch.ones(3, 3).tril().bool()
    want[5, 5] = want[6, 6] = True                              # padding: itself only (no all-False row, no NaN)
    assert torch.equal(m[0, 0], want)


class _MaskCache:
    """The cache protocol (MLA.forward) storing nothing and returning a fixed mask: attention of a packed row on the
    absorbed path, as SFT used to train."""

    def __init__(self, mask):
        self.mask = mask

    def update(self, layer, c_kv, k_pe):
        return c_kv, k_pe, self.mask


@pytest.mark.parametrize("part", ["trunk", "mtp"])
def test_full_path_with_document_mask_equals_absorbed_path(part):
    """The two attention paths of MLA agree under a document mask on the same packed rows: the full path (per-head
    keys, SDPA with the mask) and the absorbed path (attention against the latent, the mask from a cache)."""
    model = _model()
    ids, _, pos, seg = _pack(_documents(model.cfg.vocab_size))
    mask = document_mask(seg)
    with torch.no_grad():
        full, rope = model.trunk(ids, pos, mask=mask)
        absorbed, _ = model.trunk(ids, pos, cache=_MaskCache(mask))
        if part == "mtp":
            full = model.mtp_hidden(full, ids, mask=mask, rope=rope)
            absorbed = model.mtp_hidden(absorbed, ids, cache=_MaskCache(mask), rope=rope)
        causal, _ = model.trunk(ids, pos)
    assert torch.isfinite(full).all()
    assert rel_err(full, absorbed) < TOL
    assert rel_err(causal, absorbed) > 100 * TOL                 # the mask matters on these rows


def test_mask_and_cache_together_is_an_error():
    model = _model()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="both a mask and a cache"):
        model(ids, mask=torch.ones(4, 4, dtype=torch.bool).tril(), cache=_MaskCache(None))
