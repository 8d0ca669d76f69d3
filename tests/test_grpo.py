"""GRPO: the math against hand-computed numbers, then the trainer on a tiny model."""

import math

import pytest
import torch

from nanoseek.rl import group_advantages, k3_kl, policy_loss, token_logprobs, zero_std_groups

# ---------------------------------------------------------------------------------------------- advantages
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0],
                        [1.0, 1.0, 1.0, 1.0]])


def test_group_advantage_matches_hand_computation():
    # group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735; group 1: all equal -> 0 (no signal)
    a = group_advantages(REWARDS, "group", eps=1e-4)
    s = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(a, torch.tensor([[s, -s, -s, s], [0.0, 0.0, 0.0, 0.0]]), atol=1e-6)


def test_batch_advantage_divides_by_the_std_of_all_rewards():
    # centred within each group, divided by the sample std of all 8 rewards: sqrt((6 * 0.75^2... ) )
    # rewards 1,0,0,1,1,1,1,1: mean 0.75, sum of squared deviations 6 * 0.0625 + 2 * 0.5625 = 1.5, std sqrt(1.5 / 7)
    a = group_advantages(REWARDS, "batch", eps=0.0)
    s = 0.5 / math.sqrt(1.5 / 7)
    assert torch.allclose(a, torch.tensor([[s, -s, -s, s], [0.0, 0.0, 0.0, 0.0]]), atol=1e-6)


def test_no_scaling_keeps_raw_centred_rewards():
    a = group_advantages(REWARDS, "none")
    assert torch.equal(a, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))


def test_zero_std_groups_are_detected():
    assert zero_std_groups(REWARDS).tolist() == [False, True]


def test_unknown_scale_rewards_is_rejected():
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(REWARDS, "median")


# ---------------------------------------------------------------------------------------------- the loss
# Two completions, three token slots. ratio rho = exp(logp - old_logp) chosen by hand; row 1's last token is
# masked (padding or a truncated tail).
RATIO = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.1, 0.7]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADV = torch.tensor([1.0, -2.0])
OLD = torch.full((2, 3), -1.0)
LOGP = OLD + RATIO.log()
# per token -min(rho A, clip(rho, 0.8, 1.2) A):
#   row 0 (A = 1):  -1, -min(1.5, 1.2) = -1.2 (clipped), -min(0.5, 0.8) = -0.5
#   row 1 (A = -2): 2, -min(-2.2, -2.2) = 2.2, masked
PER_TOKEN = torch.tensor([[-1.0, -1.2, -0.5], [2.0, 2.2, 0.0]])


@pytest.mark.parametrize("loss_type,expected", [
    ("grpo", ((-2.7 / 3) + (4.2 / 2)) / 2),   # mean over each completion's tokens, then over completions = 0.6
    ("dapo", 1.5 / 5),                         # all unmasked tokens together: sum 1.5 over 5 tokens = 0.3
    ("dr_grpo", 1.5 / (2 * 4)),                # sum / (N * max_tokens) with a completion budget of 4
])
def test_each_loss_type_matches_hand_computation(loss_type, expected):
    out = policy_loss(LOGP, OLD, ADV, MASK, loss_type=loss_type, eps_low=0.2, eps_high=0.2, max_tokens=4)
    assert torch.allclose(out.per_token, PER_TOKEN, atol=1e-6)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_clip_fraction_counts_tokens_where_clipping_stops_the_gradient():
    # only row 0 token 1 (rho 1.5 > 1.2 with A > 0); row 1 token 2 (rho 0.7 < 0.8, A < 0) is clipped but masked,
    # row 0 token 2 (rho 0.5 with A > 0) is below the range but the unclipped branch is the min: not clipped
    out = policy_loss(LOGP, OLD, ADV, MASK, eps_low=0.2, eps_high=0.2)
    assert out.clip_frac.item() == pytest.approx(1 / 5)
    logp = LOGP.clone().requires_grad_(True)
    policy_loss(logp, OLD, ADV, MASK, loss_type="dapo").loss.backward()
    assert logp.grad[0, 1].item() == 0.0 and logp.grad[1, 2].item() == 0.0
    assert logp.grad[0, 0].item() != 0.0 and logp.grad[0, 2].item() != 0.0


def test_clip_higher_lets_positive_advantages_grow_further():
    # eps_high = 0.6 (DAPO's clip-higher, exaggerated): rho 1.5 is now inside the range, so it is not clipped
    out = policy_loss(LOGP, OLD, ADV, MASK, loss_type="dapo", eps_low=0.2, eps_high=0.6)
    assert out.per_token[0, 1].item() == pytest.approx(-1.5)
    assert out.clip_frac.item() == 0.0


def test_on_policy_gradient_is_minus_advantage_over_length():
    # num_iterations = 1: old = logp.detach(), ratio = 1, the GRPO gradient wrt logp_it is -A_i / |o_i| / N
    logp = LOGP.clone().requires_grad_(True)
    policy_loss(logp, logp.detach(), ADV, MASK, loss_type="grpo").loss.backward()
    expected = torch.tensor([[-1 / 3, -1 / 3, -1 / 3], [2 / 2, 2 / 2, 0.0]]) / 2
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_micro_batches_with_global_denominators_sum_to_the_full_batch_loss():
    for lt in ("grpo", "dapo", "dr_grpo"):
        full = policy_loss(LOGP, OLD, ADV, MASK, loss_type=lt, max_tokens=4).loss
        parts = sum(policy_loss(LOGP[i:i + 1], OLD[i:i + 1], ADV[i:i + 1], MASK[i:i + 1], loss_type=lt,
                                max_tokens=4, num_seqs=2, num_tokens=MASK.sum()).loss for i in range(2))
        assert parts.item() == pytest.approx(full.item(), abs=1e-6), lt


# ---------------------------------------------------------------------------------------------- KL
def test_kl_is_zero_when_policy_equals_reference():
    logp = torch.log_softmax(torch.randn(3, 5), -1)
    assert torch.equal(k3_kl(logp, logp), torch.zeros(3, 5))
    with_kl = policy_loss(logp, logp, torch.ones(3), torch.ones(3, 5), beta=0.04, ref_logp=logp)
    without = policy_loss(logp, logp, torch.ones(3), torch.ones(3, 5), beta=0.0)
    assert with_kl.kl.item() == 0.0 and with_kl.loss.item() == without.loss.item()


def test_k3_kl_matches_hand_computation():
    # pi_ref / pi = 2: 2 - ln 2 - 1 = 0.306853
    kl = k3_kl(torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)]))
    assert kl.item() == pytest.approx(2 - math.log(2) - 1, abs=1e-6)


def test_kl_term_adds_beta_times_k3_per_token():
    logp, ref = torch.full((1, 2), math.log(0.25)), torch.full((1, 2), math.log(0.5))
    out = policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), beta=0.1, ref_logp=ref, loss_type="dapo")
    assert out.loss.item() == pytest.approx(0.1 * (1 - math.log(2)), abs=1e-6)


def test_token_logprobs_use_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    lp, ent = token_logprobs(logits, torch.tensor([[0]]), temperature=0.5)
    ref = torch.log_softmax(logits / 0.5, -1)
    assert lp.item() == pytest.approx(ref[0, 0, 0].item(), abs=1e-6)
    assert ent.item() == pytest.approx(-(ref.exp() * ref).sum().item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def tiny():
    """A tiny random model and a 300-token tokenizer trained on a few task documents."""
    from nanoseek.data.tasks import corpus_documents
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.train(list(corpus_documents(200)), 300, progress=False)
    torch.manual_seed(0)
    return ns_model(tok), tok


def ns_model(tok):
    import nanoseek as ns
    torch.manual_seed(0)
    return ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size))


def digit_reward(problems, texts, task):
    """Favours one kind of token: the fraction of the completion's characters that are digits."""
    return [sum(c.isdigit() for c in t) / max(1, len(t)) for t in texts]


def _run(tmp_path, tok, name, **kw):
    import json

    from nanoseek.train.grpo import GRPOConfig, grpo
    cfg = dict(task="arithmetic", out=str(tmp_path / name), steps=8, prompts_per_step=4, group_size=8,
               max_tokens=8, lr=3e-2, temperature=1.0, mask_truncated=False, progress=False, save_every=100)
    cfg.update(kw)
    final = grpo(GRPOConfig(**cfg), reward_funcs=[digit_reward], model=ns_model(tok), tokenizer=tok)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return final, rows


def test_short_grpo_run_raises_reward_and_engine_logprobs_match_training(tmp_path, tiny):
    _, tok = tiny
    final, rows = _run(tmp_path, tok, "run")
    first = sum(r["reward_mean"] for r in rows[:2]) / 2
    last = sum(r["reward_mean"] for r in rows[-2:]) / 2
    # a random tiny model writes ~2% digit characters; 8 steps at lr 3e-2 make digits a large share of the text
    assert last > max(3 * first, 0.2), [r["reward_mean"] for r in rows]
    # step 0: the engine's sampling log-probs (absorbed MLA over the paged cache) and the training forward (full
    # MLA) agree to float32 rounding; a mismatch would make every ratio off-policy noise
    assert rows[0]["logprob_gap"] < 1e-4
    for key in ("reward_std", "accuracy", "format_rate", "kl", "clip_frac", "completion_len", "entropy",
                "frac_zero_std", "logprob_gap"):
        assert key in rows[0]
    assert (final / "config.json").exists() and (final / "tokenizer.json").exists()
    assert (tmp_path / "run" / "reward.png").exists() and (tmp_path / "run" / "samples.jsonl").exists()


def test_grpo_resume_is_bit_identical(tmp_path, tiny):
    from safetensors.torch import load_file
    _, tok = tiny
    kw = dict(steps=4, beta=0.04, num_iterations=2, loss_type="grpo")   # reference model and old-policy ratio too
    _run(tmp_path, tok, "straight", **kw)
    _run(tmp_path, tok, "cut", stop_after=2, **kw)
    _, rows = _run(tmp_path, tok, "cut", resume=True, **kw)
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_old_option_names_warmup_steps_and_bias_gamma_still_work(tmp_path):
    import argparse

    from nanoseek.options import add_options, make_config
    from nanoseek.train.grpo import GRPOConfig

    p = add_options(argparse.ArgumentParser(), GRPOConfig)
    cfg = make_config(GRPOConfig, p.parse_args(["--warmup-steps", "7", "--bias-gamma", "0.01"]), required=())
    assert (cfg.warmup, cfg.bias_update_speed) == (7, 0.01)
    (tmp_path / "old.toml").write_text("warmup_steps = 5\n")
    assert make_config(GRPOConfig, p.parse_args(["--config", str(tmp_path / "old.toml")]), required=()).warmup == 5


# ---------------------------------------------------------------------------------------------- the costs (issue 13)


class Completion:
    """What rl.group_batch reads of an engine Completion."""

    def __init__(self, prompt, tokens):
        self.prompt_token_ids, self.token_ids, self.logprobs = prompt, tokens, None


def test_reference_logprobs_in_one_forward_equal_one_forward_per_micro_batch(tiny):
    from nanoseek.rl import group_batch
    from nanoseek.train.grpo import forward_logprobs, reference_logprobs
    model, tok = tiny
    model = model.eval()
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, tok.vocab_size, (n,), generator=g).tolist()   # noqa: E731
    # 5 prompts of 5-9 tokens x 2 completions of 1-12: micro-batches of different widths, a group split across two of
    # them, and a padding micro-batch at the end (a process with none left)
    prompts = [ids(5 + i) for i in range(5)]
    comps = [Completion(prompts[i // 2], ids(1 + (7 * i) % 12)) for i in range(10)]
    chunks = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9], []]
    rows = [group_batch(comps, c, 0) for c in chunks]
    cpu = torch.device("cpu")
    apart = [forward_logprobs(model, r, 0.7, cpu)[0] for r in rows]
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:   # (each forward of a GroupBatch is two model calls: the prompts, then the completions)
        for max_logits, forwards in ((2**27, 2), (1, 4)):   # all real micro-batches in one forward / one each
            calls.clear()
            joint = reference_logprobs(model, comps, chunks, rows, 0, 0.7, cpu, max_logits=max_logits)
            assert len(calls) == 2 * forwards
            assert [x.shape for x in joint] == [x.shape for x in apart]
            for j, (a, b, r) in enumerate(zip(joint, apart, rows)):
                # the same products over more (padding) rows and columns: float32 rounding, measured <= 5e-7
                assert torch.allclose(a * r.mask, b * r.mask, atol=1e-5), (j, (a - b).abs().max())
    finally:
        hook.remove()
    # a comparison that can fail: the micro-batches' columns shifted by one position differ by far more
    assert not torch.allclose(joint[1][:, 1:] * rows[1].mask[:, 1:], apart[1][:, :-1] * rows[1].mask[:, 1:], atol=1e-2)


def test_auto_compiles_the_rollouts_when_the_run_decodes_enough_steps():
    from nanoseek.infer.compiled import AUTO_MIN_STEPS
    from nanoseek.train.grpo import rollout_compile
    cpu = torch.device("cpu")
    bar = AUTO_MIN_STEPS["cpu"]
    assert rollout_compile("auto", bar // 64, 64, cpu)[0] is (bar // 64 * 64 >= bar)
    assert rollout_compile("auto", bar // 64 + 1, 64, cpu)[0] is True
    assert rollout_compile("auto", 4, 64, cpu)[0] is False      # bench/grpo.py's short run: stays eager
    assert rollout_compile("auto", 100, 128, cpu)[0] is True    # the default 100 steps x 128 tokens
    assert rollout_compile("true", 1, 1, cpu) == (True, "") and rollout_compile("false", 10**6, 128, cpu)[0] is False
    assert "4 rollouts x 64 tokens" in rollout_compile("auto", 4, 64, cpu)[1]


def test_auto_compiles_the_training_forward_for_long_runs_only(monkeypatch):
    from nanoseek.infer import compiled
    from nanoseek.rl import AUTO_TRAIN_STEPS, training_compile
    cpu = torch.device("cpu")
    assert training_compile("auto", AUTO_TRAIN_STEPS - 1, cpu)[0] is False
    assert training_compile("auto", AUTO_TRAIN_STEPS, cpu)[0] is True
    assert training_compile("true", 1, cpu)[0] is True and training_compile("false", 10**6, cpu) == (False, "")
    assert training_compile("true", 1, cpu, distributed=True) == (False, "training forward eager: not under torchrun")
    monkeypatch.setattr(compiled, "unavailable", lambda device: "no C++ compiler found (g++)")
    assert training_compile("true", 10**6, cpu) == (False, "training forward eager: no C++ compiler found (g++)")


SPEED = ("logprob_gap", "step_s", "tokens_per_s", "elapsed_s")     # what may differ between compiled and eager


def test_compiled_rollouts_train_exactly_as_eager_rollouts(tmp_path, tiny, monkeypatch):
    """Compiled and eager decode give the same sampled tokens (logits within ~1e-6: a seeded draw flips only on a
    CDF boundary that close), and the training forward never sees the engine's numbers but through logprob_gap, so
    the run is the same to the last bit: same rewards, same weights. (The training forward stays eager here: compiled,
    it rounds differently, tests/test_grpo_prefix.py.)"""
    from safetensors.torch import load_file

    from nanoseek import rl
    from nanoseek.infer import compiled
    monkeypatch.setattr(rl, "training_compile", lambda *a: (False, ""))
    _, tok = tiny
    calls = []
    real = compiled.CompiledDecode.logits
    monkeypatch.setattr(compiled.CompiledDecode, "logits", lambda self, *a: calls.append(1) or real(self, *a))
    kw = dict(steps=3, prompts_per_step=2, group_size=4, beta=0.04, num_iterations=2)
    _, eager = _run(tmp_path, tok, "eager", compile="false", **kw)
    assert not calls
    _, fast = _run(tmp_path, tok, "compiled", compile="true", **kw)
    assert len(calls) >= 3 * 7                     # every decode step of the 3 rollouts (8 tokens: 7 decode steps)
    for a, b in zip(eager, fast):
        assert {k: v for k, v in a.items() if k not in SPEED} == \
            {k: v for k, v in b.items() if k not in SPEED}
        assert b["logprob_gap"] < 1e-4
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("eager", "compiled"))
    assert all(torch.equal(a[k], b[k]) for k in a)
