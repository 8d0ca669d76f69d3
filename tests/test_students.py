"""Post-training the dense families (R1's students: qwen2, llama, qwen3) and distilling a DeepSeek teacher into a
student of another architecture with its own tokenizer (DeepSeek-R1 Section 2.4)."""

import json

import pytest
import torch
from conftest import metrics_rows

import nanoseek as ns
from nanoseek.checkpoint import load_model_and_tokenizer
from nanoseek.data.tasks import corpus_documents, register_task
from nanoseek.tokenizer import Tokenizer

# A ChatML template in the style of Qwen's (written for this test): the reasoning_content of an assistant turn inside
# <think> tags before its content, and a generation prompt that leaves the opening <think> to the model
CHATML = """{%- for m in messages -%}
{{- '<|im_start|>' + m['role'] + '\\n' -}}
{%- if m['role'] == 'assistant' and m.get('reasoning_content') -%}
{{- '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' -}}
{%- endif -%}
{{- m['content'] + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"""


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(list(corpus_documents(200)), 300, progress=False)


@pytest.fixture(scope="module")
def qwen_tok():
    """Another byte-level BPE, Qwen-style: other special tokens (ChatML, EOS <|im_end|>, no BOS), no digit split,
    another vocabulary size, so the teacher's token ids mean nothing to it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tk.train_from_iterator(list(corpus_documents(200)), trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(tk, chat_template=CHATML, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def dense(preset, tok, seed=0):
    torch.manual_seed(seed)
    return ns.Transformer(ns.ModelConfig.preset(preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id or 0,
                                                eos_token_id=tok.eos_id))


rows = metrics_rows


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_sft_of_a_dense_model_folder_lowers_its_loss_with_no_bias_hook(tmp_path, tok, preset, monkeypatch):
    from nanoseek.train import optim
    from nanoseek.train.sft import SFTConfig, sft

    ns.save(dense(preset, tok), tmp_path / "model", tokenizer=tok)
    hooks = []
    real = optim.add_bias_update
    monkeypatch.setattr(optim, "add_bias_update", lambda *a: hooks.append(real(*a)) or hooks[-1])
    final = sft(SFTConfig(model=str(tmp_path / "model"), task="arithmetic", out=str(tmp_path / "run"), steps=8,
                          batch_size=4, seq_len=192, lr=3e-3, warmup=0, bias_update_speed=0.01, progress=False))
    r = rows(tmp_path / "run")
    assert r[-1]["loss"] < r[0]["loss"] - 0.5, [x["loss"] for x in r]
    assert hooks == [None]                   # no MoE gate: the V3 bias update is simply not registered
    model, _ = load_model_and_tokenizer(final)
    assert model.cfg.model_type == preset.removeprefix("tiny-") and not len(model.mtp)


def digit_reward(problems, texts, task):
    """The fraction of a completion's characters that are digits: a random model already earns some of it."""
    return [sum(c.isdigit() for c in t) / max(1, len(t)) for t in texts]


def test_grpo_on_a_tiny_qwen2_raises_reward(tmp_path, tok):
    from nanoseek.train.grpo import GRPOConfig, grpo

    ns.save(dense("tiny-qwen2", tok), tmp_path / "policy", tokenizer=tok)
    cfg = GRPOConfig(model=str(tmp_path / "policy"), task="arithmetic", out=str(tmp_path / "run"), steps=8,
                     prompts_per_step=4, group_size=8, max_tokens=8, lr=3e-2, mask_truncated=False, progress=False)
    grpo(cfg, reward_funcs=[digit_reward])
    r = rows(tmp_path / "run")
    first, last = (sum(x["reward_mean"] for x in part) / 2 for part in (r[:2], r[-2:]))
    assert last > max(3 * first, 0.2), [x["reward_mean"] for x in r]
    # the engine (paged GQA K/V cache) and the training forward (full GQA) agree: on-policy ratios
    assert r[0]["logprob_gap"] < 1e-4


def test_sft_and_eval_take_a_gguf_file(tmp_path, tok):
    from nanoseek.eval import evaluate
    from nanoseek.gguf import export_gguf
    from nanoseek.train.sft import SFTConfig, sft

    export_gguf(dense("tiny-qwen2", tok), tok, tmp_path / "m.gguf", type="f32")
    final = sft(SFTConfig(model=str(tmp_path / "m.gguf"), task="arithmetic", out=str(tmp_path / "run"), steps=4,
                          batch_size=4, seq_len=192, lr=3e-3, warmup=0, progress=False))
    r = rows(tmp_path / "run")
    assert r[-1]["loss"] < r[0]["loss"]
    assert evaluate(str(tmp_path / "m.gguf"), "arithmetic", n=4, max_tokens=8)["n"] == 4
    assert load_model_and_tokenizer(final)[0].cfg.model_type == "qwen2"


@pytest.fixture(scope="module")
def say_task():
    """Say a digit: short traces a tiny teacher learns in a few seconds, right about one time in ten at first."""
    def generate(rng, difficulty):
        n = rng.randrange(10)
        return f"Say {n}.", n, f"say {n}"
    return register_task("say-digit", generate=generate, check=lambda p, a: a == p.answer)


def test_distill_deepseek_teacher_into_qwen2_student_with_its_own_tokenizer(tmp_path, tok, qwen_tok, say_task):
    from nanoseek.train.distill import DistillConfig, distill
    from nanoseek.train.sft import SFTConfig, sft

    torch.manual_seed(0)
    teacher = ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size))   # DeepSeek: MLA, MoE, MTP
    sft(SFTConfig(task="say-digit", out=str(tmp_path / "teach"), steps=60, batch_size=8, seq_len=128, lr=5e-3,
                  warmup=5, progress=False), model=teacher, tokenizer=tok)
    ns.save(dense("tiny-qwen2", qwen_tok), tmp_path / "student", tokenizer=qwen_tok)
    final = distill(DistillConfig(teacher=str(tmp_path / "teach" / "final"), task="say-digit", out=str(tmp_path / "d"),
                                  student=str(tmp_path / "student"), problems=16, samples_per_problem=4,
                                  max_tokens=24, steps=6, batch_size=4, seq_len=128, lr=3e-3, warmup=0,
                                  progress=False))
    stats = json.loads((tmp_path / "d" / "rejection.json").read_text())
    traces = [json.loads(x)["messages"] for x in (tmp_path / "d" / "traces.jsonl").read_text().splitlines()]
    assert 0 < stats["kept"] == len(traces) < stats["generated"] == 64     # the wrong ones were rejected
    # only correct traces, stored as text: the teacher's reasoning and answer as chat messages
    for conv in traces:
        question, answer = conv[0]["content"], conv[-1]
        assert answer["content"] == f"<answer>{question.split()[1].rstrip('.')}</answer>", conv
        assert answer["reasoning_content"] and "<｜" not in answer["content"] + answer["reasoning_content"]
    # the student learns them as its own template renders them, in its own tokens (reasoning and answer trained)
    from nanoseek.data.chat import render
    (ids, mask), = render(qwen_tok, traces[0])
    trained = qwen_tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained.startswith("<think>\n" + traces[0][-1]["reasoning_content"]) and trained.endswith("<|im_end|>\n")
    # OUT/final is a qwen2 folder with the student's tokenizer that loads
    student, stok = load_model_and_tokenizer(final)
    assert student.cfg.model_type == "qwen2" and stok.vocab_size == qwen_tok.vocab_size != tok.vocab_size
    assert stok.encode("<|im_end|>") == [stok.eos_id] and stok.token_to_id("<｜end▁of▁sentence｜>") is None
    r = rows(tmp_path / "d")
    assert len(r) == 6 and all(x["trained_tokens"] > 0 for x in r) and r[-1]["loss"] < r[0]["loss"]
