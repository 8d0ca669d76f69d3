"""GRPO's shared-prefix training forward (rl.SharedPrefix, rl.group_batch, rl.group_logits): each group's prompt is
computed once and its completions attend to its keys and values. It must give what the plain forward gives, one
right-padded row prompt + completion per completion: the same log-probs and the same parameter gradients (the
prompt's gradient is the sum over its copies), up to float32 rounding."""

import pytest
import torch

import nanoseek as ns
from nanoseek.rl import SharedPrefix, group_batch, group_logits, group_logprobs, takes_prefix, token_logprobs


class Completion:
    """What group_batch reads of an engine Completion."""

    def __init__(self, prompt, tokens, logprobs=None, finish_reason="stop"):
        self.prompt_token_ids, self.token_ids, self.logprobs = prompt, tokens, logprobs
        self.finish_reason = finish_reason


def model_of(preset: str, **overrides):
    torch.manual_seed(0)
    return ns.Transformer(ns.ModelConfig.preset(preset, num_nextn_predict_layers=0, **overrides)).eval()


def completions(vocab: int, short: bool = False, seed: int = 0):
    """Three prompts of 7, 3 and 11 tokens; groups of 4, 2 and 3 completions listed out of group order, of 0 to 13
    tokens (an empty completion and a one-token one among them); short=True: 0 to 2 tokens (one completion column)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()   # noqa: E731
    prompts = [ids(7), ids(3), ids(11)]
    plan = [(0, 13), (1, 5), (2, 0), (0, 1), (2, 9), (0, 8), (1, 12), (2, 4), (0, 6)]
    return [Completion(prompts[p], ids(k % 3 if short else k)) for p, k in plan]


def padded_logprobs(model, comps, temperature: float = 0.7):
    """The plain forward: one right-padded row prompt + completion per completion -> log-probs (N, K) of the
    completion tokens, column 0 = each one's first (0 where masked), and the mask."""
    seqs = [c.prompt_token_ids + c.token_ids for c in comps]
    T, K = max(map(len, seqs)) - 1, max(2, *(len(c.token_ids) for c in comps))
    logits = model(torch.tensor([s[:-1] + [0] * (T + 1 - len(s)) for s in seqs]))            # (N, T, V)
    start = torch.tensor([len(c.prompt_token_ids) - 1 for c in comps])
    cols = (start[:, None] + torch.arange(K)).clamp(max=T - 1)                                # (N, K)
    targets = torch.tensor([c.token_ids + [0] * (K - len(c.token_ids)) for c in comps])
    mask = torch.tensor([[1.0] * len(c.token_ids) + [0.0] * (K - len(c.token_ids)) for c in comps])
    logp = token_logprobs(logits[torch.arange(len(comps))[:, None], cols], targets, temperature)[0]
    return logp * mask, mask


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-v3.2", "tiny-v4"])
@pytest.mark.parametrize("short", [False, True])
def test_shared_prefix_forward_equals_the_padded_rows(preset, short):
    # MLA + MoE; GQA (ratio 2, qk-norm); DSA and deepseek_v4, whose attention takes no prefix: rl.padded_logits.
    # deepseek_v4 with index_topk above the rows' compressed entries: its indexer's discrete top-k would turn float32
    # rounding of a near-tie (another batch width: 5e-3 in one row, measured) into another selection
    model = model_of(preset, **({"index_topk": 64} if preset == "tiny-v4" else {}))
    comps = completions(model.cfg.vocab_size, short)
    want, mask = padded_logprobs(model, comps)
    (want.sum() / mask.sum()).backward()
    want_grads = grads(model)
    model.zero_grad(set_to_none=True)

    b = group_batch(comps, list(range(len(comps))), pad_id=0)
    assert b.prompts.shape[0] == 3 and b.group.tolist() == [0, 1, 2, 0, 2, 0, 1, 2, 0]    # each prompt once
    assert takes_prefix(model.cfg) == (preset not in ("tiny-v3.2", "tiny-v4"))
    got = group_logprobs(model, b, 0.7)[0] * b.mask
    K = want.shape[1]
    assert torch.equal(b.mask[:, :K], mask) and not b.mask[:, K:].any()
    # the same products summed in another order (the prompt's keys read from a shared tensor, attention under an
    # explicit mask): float32 rounding, measured <= 1e-6 on the log-probs, <= 5e-7 on gradients of size up to 1
    assert (got[:, :K] - want).abs().max() < 1e-5
    (got.sum() / b.mask.sum()).backward()
    got_grads = grads(model)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        assert (got_grads[n] - want_grads[n]).abs().max() < 1e-5, n


def test_a_prefix_from_the_wrong_group_changes_the_logprobs():
    # the negative control: the same completions reading another group's prompt (its keys, values and positions)
    model = model_of("tiny")
    comps = completions(model.cfg.vocab_size)
    b = group_batch(comps, list(range(len(comps))), pad_id=0)
    right = group_logprobs(model, b)[0] * b.mask
    b.group = (b.group + 1) % 3
    wrong = group_logprobs(model, b)[0] * b.mask
    assert (right - wrong).abs().max() > 0.05


def test_group_batch_pads_a_process_with_no_completion_left():
    b = group_batch([], [], pad_id=5)
    assert b.prompts.tolist() == [[5]] and b.group.tolist() == [0] and not b.mask.any()
    assert group_logits(model_of("tiny"), b).shape == (1, 2, 512)


def test_the_engine_logprobs_ride_along_aligned_with_the_targets():
    comps = [Completion([4, 5, 6], [7, 8, 9], [-0.5, -1.5, -2.5]), Completion([4, 5, 6], [10], [-3.0])]
    b = group_batch(comps, [0, 1], pad_id=0)
    assert b.targets.tolist() == [[7, 8, 9], [10, 0, 0]] and b.inputs.tolist() == [[7, 8], [0, 0]]
    assert b.engine_logprobs.tolist() == [[-0.5, -1.5, -2.5], [-3.0, 0.0, 0.0]]
    assert b.lengths.tolist() == [3] and b.group.tolist() == [0, 0]


def test_attention_without_a_full_path_refuses_a_prefix():
    prefix = SharedPrefix(torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(ValueError, match="deepseek_v4"):
        model_of("tiny-v4").trunk(torch.tensor([[3, 4]]), prefix=prefix)
    mla = model_of("tiny").layers[0].self_attn
    with pytest.raises(ValueError, match="pass the prefix alone"):
        mla(torch.zeros(1, 2, 64), *model_of("tiny").rotary(torch.arange(2)[None]), mask=torch.ones(2, 2).bool(),
            prefix=prefix)


# ---------------------------------------------------------------------------------------------- the trainer
class Optimizer:
    """Records the gradients train_on_rollout hands to the optimizer step (and changes no weight)."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.seen.append(grads(self.model))


@pytest.mark.parametrize("loss_type,micro_batch,compiled", [
    ("dapo", 32, False), ("grpo", 4, False), ("dr_grpo", 3, False),
    # the compiled training forward (rl.compiled_group_logprobs): ~100 s of compiling from a cold inductor cache
    pytest.param("grpo", 3, True, marks=pytest.mark.slow)])
def test_train_on_rollout_takes_the_loss_and_gradient_of_the_padded_rows(loss_type, micro_batch, compiled):
    from nanoseek.rl import group_advantages, policy_loss
    from nanoseek.train import runtime
    from nanoseek.train.grpo import GRPOConfig, Rollout, train_on_rollout

    model = model_of("tiny")
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist()   # noqa: E731
    # 3 prompts (3, 7 and 11 tokens) x G = 4 completions of 0-14 tokens, group by group as rollout() returns them
    comps = [Completion(p, ids(k)) for p, ks in zip((ids(3), ids(7), ids(11)), ((5, 0, 14, 2), (1, 9, 3, 12),
                                                                                (7, 7, 4, 10))) for k in ks]
    rewards = torch.rand(3, 4, generator=g)
    ro = Rollout([None] * 3, comps, 0, rewards, {}, torch.zeros(12), torch.zeros(12, dtype=torch.bool))
    cfg = GRPOConfig(loss_type=loss_type, micro_batch=micro_batch, grad_clip=0.0, beta=0.0, max_tokens=16,
                     temperature=0.7, dynamic_sampling=False)
    opt = Optimizer(model)
    torch._dynamo.utils.counters.clear()
    stats = train_on_rollout(model, opt, ro, cfg, 0, None, runtime.init("cpu"), compiled=compiled)
    if compiled:   # micro-batches of 3: of 1 prompt or 2, 3-14 columns; one graph for 1 prompt (torch specialises a
        # size of 1), one for 2, none per length
        counters = torch._dynamo.utils.counters
        assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])

    tol = 1e-5 if compiled else 1e-6       # (a compiled graph rounds differently)
    logp, mask = padded_logprobs(model, comps)
    out = policy_loss(logp, logp.detach(), group_advantages(rewards).flatten(), mask, loss_type=loss_type,
                      max_tokens=16)
    model.zero_grad(set_to_none=True)
    out.loss.backward(retain_graph=True)
    assert abs(stats["loss"] - out.loss.item()) < tol and stats["trained_tokens"] == int(mask.sum())
    for n, want in grads(model).items():
        assert (opt.seen[0][n] - want).abs().max() < tol, n
    # a comparison that can fail: the advantages of another group order give another gradient
    out = policy_loss(logp, logp.detach(), group_advantages(rewards.roll(1, 0)).flatten(), mask,
                      loss_type=loss_type, max_tokens=16)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    assert max((opt.seen[0][n] - w).abs().max() for n, w in grads(model).items()) > 1e-4


# ---------------------------------------------------------------------------------------------- the rollouts
def test_generate_decodes_text_once_a_request_ends_and_gets_the_streamed_text():
    """generate() (GRPO's rollouts) reads a request's text when it ends, so without stop strings its text is decoded
    then, by the same rules, not token by token: the same text, reasoning and content as the server's step() loop."""
    tok = ns.Tokenizer.train(["naïve café, 日本語のテキスト 🙂 <think>why</think> 42\n"] * 50, vocab_size=320,
                             progress=False)
    torch.manual_seed(0)
    model = ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size, initializer_range=0.3)).eval()
    # high temperature over a byte-level vocabulary: characters split across tokens (U+FFFD held back) and think tags;
    # half the prompts open a <think> (the reasoning / content split)
    prompts = [tok.encode("café") + ([tok.think_start_id] if i % 2 else []) for i in range(12)]
    params = [ns.SamplingParams(temperature=2.0, max_tokens=40, seed=i) for i in range(12)]
    eng = ns.Engine(model, tok, max_batch=12, mtp=False, compile=False)
    batch = eng.generate(prompts, params)
    rids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]       # the server's way: deltas as they come
    streamed, text = {}, {r: "" for r in rids}
    while eng.has_unfinished():
        for d in eng.step():
            text[d.request_id] += d.raw_text
            if d.finished:
                streamed[d.request_id] = d.completion
    for b, rid in zip(batch, rids):
        s = streamed[rid]
        assert (b.token_ids, b.text, b.reasoning_content, b.content) == (s.token_ids, s.text, s.reasoning_content,
                                                                         s.content)
        assert text[rid] == s.text
    joined = "".join(b.text for b in batch)
    assert "\ufffd" in joined or any(ord(c) > 127 for c in joined)          # split characters were exercised
    assert any(b.reasoning_content for b in batch) and any(b.content for b in batch)


def test_generate_streams_no_text_before_a_request_ends_unless_it_has_stop_strings():
    tok = ns.Tokenizer.train(["the quick brown fox 123\n"] * 50, vocab_size=300, progress=False)
    torch.manual_seed(0)
    model = ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size)).eval()
    eng = ns.Engine(model, tok, max_batch=4, mtp=False, compile=False)
    seen = []
    step = eng.step
    eng.step = lambda: _record(step, seen)
    plain = ns.SamplingParams(temperature=1.0, max_tokens=12, seed=1, ignore_eos=True)
    eng.generate([tok.encode("the")] * 2, plain)
    assert seen and not any(d.raw_text for d in seen if not d.finished)       # decoded once, at the end
    seen.clear()
    eng.generate([tok.encode("the")] * 2, ns.SamplingParams(temperature=1.0, max_tokens=12, seed=1, ignore_eos=True,
                                                            stop=["zzz"]))
    assert any(d.raw_text for d in seen if not d.finished)                    # a stop string needs the text as it grows


def _record(step, seen):
    out = step()
    seen.extend(out)
    return out


def test_a_batch_where_every_row_samples_draws_what_a_mixed_batch_draws():
    # GRPO's rollouts: every row samples (no argmax, no row gather, temperature 1 divides nothing); the same rows next
    # to a greedy one take the general path: the same tokens and log-probs, step after step
    from nanoseek.infer.sampling import sample
    g = torch.Generator().manual_seed(0)
    params = [ns.SamplingParams(temperature=t, top_p=p, seed=i, logprobs=True)
              for i, (t, p) in enumerate([(1.0, 1.0), (1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (1.3, 0.95)])]
    greedy = ns.SamplingParams(temperature=0, logprobs=True)
    gens = lambda: [torch.Generator().manual_seed(p.seed) for p in params]   # noqa: E731
    ga, gb = gens(), gens() + [None]
    for _ in range(4):
        logits = torch.randn(5, 64, generator=g) * 3
        alone = sample(logits, params, ga, [[1]] * 5, [[2]] * 5)
        mixed = sample(torch.cat([logits, logits[:1]]), params + [greedy], gb, [[1]] * 6, [[2]] * 6)
        assert alone.tokens == mixed.tokens[:5] and alone.logprobs == mixed.logprobs[:5]
        assert mixed.tokens[5] == logits[0].argmax().item()
    # a comparison that can fail: other seeds draw other tokens
    other = sample(logits, params, [torch.Generator().manual_seed(100 + i) for i in range(5)], [[1]] * 5, [[2]] * 5)
    assert other.tokens != alone.tokens
