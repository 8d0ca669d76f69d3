"""SFT: assistant-only loss masks on a rendered conversation, packing, bad input, a short run."""

import json

import pytest
import torch

import nanoseek as ns
from nanoseek.errors import UsageError
from nanoseek.model import document_mask
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.sft import IGNORE, pack, read_conversations, render

CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 12+7?"},
        {"role": "assistant", "reasoning_content": "2+7=9, 1 carried 0, so 19", "content": "19"},
        {"role": "user", "content": "And 3+4?"},
        {"role": "assistant", "reasoning_content": "3+4=7", "content": "7"}]


@pytest.fixture(scope="module")
def tok():
    text = ["What is 12+7? 2+7=9, 1 carried 0, so 19. And 3+4? You are terse."] * 20
    return Tokenizer.train(text, 300, progress=False)


def test_trained_tokens_are_exactly_the_assistant_turns(tok):
    (ids, mask), = render(tok, CONV)
    assert ids == tok.apply_chat_template(CONV, add_generation_prompt=False, tokenize=True)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    masked = tok.decode([i for i, m in zip(ids, mask) if not m])
    # each assistant turn: reasoning, the closing think tag, the answer and EOS (the generation prompt's
    # "<Assistant><think>\n" is prompt, the model never has to write it)
    a1 = "2+7=9, 1 carried 0, so 19\n</think>\n\n19" + Tokenizer.EOS
    a2 = "3+4=7\n</think>\n\n7" + Tokenizer.EOS
    assert trained == a1 + a2
    assert masked == (Tokenizer.BOS + "You are terse." + Tokenizer.USER + "What is 12+7?" + Tokenizer.ASSISTANT
                      + "<think>\n" + Tokenizer.USER + "And 3+4?" + Tokenizer.ASSISTANT + "<think>\n")
    assert mask[-1] and ids[-1] == tok.eos_id


def test_packed_examples_do_not_see_each_other():
    # two examples in one row with the block-diagonal mask give the logits each gives alone (float32 rounding)
    torch.manual_seed(0)
    model = ns.Transformer(ns.ModelConfig.preset("tiny")).eval()
    a, b = torch.randint(0, 512, (7,)).tolist(), torch.randint(0, 512, (5,)).tolist()
    batch = pack([[(a, [True] * 7), (b, [False, False] + [True] * 3)]], 16)
    with torch.no_grad():
        packed = model(batch.input_ids, positions=batch.positions, mask=document_mask(batch.documents))
        alone_a, alone_b = model(torch.tensor([a])), model(torch.tensor([b]))
    assert torch.allclose(packed[0, :7], alone_a[0], atol=1e-5)
    assert torch.allclose(packed[0, 7:12], alone_b[0], atol=1e-5)
    # targets: next token inside each example, only where the next token is trained; nothing across examples
    t = batch.targets[0].tolist()
    assert t[:6] == a[1:] and t[6] == IGNORE
    assert t[7:12] == [IGNORE, b[2], b[3], b[4], IGNORE] and set(t[12:]) == {IGNORE}


def test_malformed_jsonl_lines_are_listed(tmp_path):
    p = tmp_path / "data.jsonl"
    good = json.dumps({"messages": CONV[1:3]})
    p.write_text("\n".join([good, json.dumps({"msgs": []}), good, json.dumps({"text": "x"}),
                            json.dumps({"messages": [{"role": "user", "content": "no answer"}]})]) + "\n")
    with pytest.raises(UsageError, match=r"malformed line\(s\) 2, 4, 5"):
        read_conversations(p)
    # a line that is not JSON at all is listed with the others, in one error
    p.write_text("\n".join([good, "{not json", good, json.dumps({"msgs": []})]) + "\n")
    with pytest.raises(UsageError, match=r"malformed line\(s\) 2, 4"):
        read_conversations(p)


def test_sft_on_task_lowers_loss_and_resumes_bit_identically(tmp_path, tok):
    from safetensors.torch import load_file

    from nanoseek.train.sft import SFTConfig, sft

    def run(name, **kw):
        torch.manual_seed(0)
        model = ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size))
        cfg = SFTConfig(task="arithmetic", out=str(tmp_path / name), steps=6, batch_size=4, seq_len=192, lr=3e-3,
                        warmup=0, progress=False, **kw)
        return sft(cfg, model=model, tokenizer=tok)

    straight = run("a")
    run("b", stop_after=3)
    resumed = run("b", resume=True)
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5 and all(r["trained_tokens"] > 0 for r in rows)


def test_distill_splits_teacher_text_like_the_chat_template_and_needs_one_student(tmp_path):
    from nanoseek.train.distill import DistillConfig, distill, split_completion

    text = "9x+1=46\n9x=46-1=45\nx=45/9=5\n</think>\n\n<answer>5</answer>"
    assert split_completion(text) == ("9x+1=46\n9x=46-1=45\nx=45/9=5", "<answer>5</answer>")
    with pytest.raises(UsageError, match="exactly one of --student-preset"):
        distill(DistillConfig(teacher=str(tmp_path), task="linear", out=str(tmp_path / "o")))


def test_config_file_and_command_line_merge(tmp_path):
    import argparse

    from nanoseek.options import add_options, make_config
    from nanoseek.train.grpo import GRPOConfig

    toml = tmp_path / "g.toml"
    toml.write_text('lr = 0.5\ngroup_size = 4\ndynamic_sampling = false\n')
    p = add_options(argparse.ArgumentParser(), GRPOConfig)
    args = p.parse_args(["--config", str(toml), "--lr", "0.25", "--mask-truncated", "false"])
    cfg = make_config(GRPOConfig, args, required=())     # (model/task/out left out: not what this test is about)
    assert (cfg.lr, cfg.group_size, cfg.dynamic_sampling, cfg.mask_truncated) == (0.25, 4, False, False)
    toml.write_text("learning_rate = 1\n")
    with pytest.raises(UsageError, match="unknown key"):
        make_config(GRPOConfig, p.parse_args(["--config", str(toml)]), required=())
    # a required option given nowhere (neither flag nor TOML) is one clear error; given in the TOML it is enough
    with pytest.raises(UsageError, match="--model is required"):
        make_config(GRPOConfig, p.parse_args([]), required=("model",))
    toml.write_text('model = "some/folder"\n')
    assert make_config(GRPOConfig, p.parse_args(["--config", str(toml)]), required=("model",)).model == "some/folder"


def _tiny_sft(tmp_path, tok, name, model=None, **kw):
    from nanoseek.train.sft import SFTConfig, sft

    torch.manual_seed(0)
    model = model or ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size))
    cfg = SFTConfig(task="arithmetic", out=str(tmp_path / name), steps=kw.pop("steps", 3), batch_size=2, seq_len=192,
                    lr=3e-3, warmup=0, progress=False, **kw)
    return cfg, sft(cfg, model=model, tokenizer=tok), model


def test_sft_bias_update_hook_moves_noaux_tc_biases_and_is_absent_for_greedy(tmp_path, tok, monkeypatch):
    from nanoseek.model import MoE
    from nanoseek.train import optim

    handles = []
    real = optim.add_bias_update
    monkeypatch.setattr(optim, "add_bias_update", lambda *a: handles.append(real(*a)) or handles[-1])
    for method, scoring in (("noaux_tc", "sigmoid"), ("greedy", "softmax")):
        torch.manual_seed(0)
        model = ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size, topk_method=method,
                                                     scoring_func=scoring))
        _, final, model = _tiny_sft(tmp_path, tok, method, model=model, bias_update_speed=0.01)
        biases = [m.gate.e_score_correction_bias for m in model.modules() if isinstance(m, MoE)]
        assert len(biases) == 2                                          # the main MoE layer and the MTP block's
        moved = [bool(b.abs().sum() > 0) for b in biases]
        assert moved == ([True, True] if method == "noaux_tc" else [False, False]), method
    assert handles[0] is not None and handles[1] is None


def test_sft_writes_its_effective_config_and_resumes_an_old_checkpoint(tmp_path, tok):
    # before this layout SFT checkpointed the bare model's optimizer state ("layers.0..." not "model.layers.0...")
    # and had no config.toml; such a folder resumes to the weights of an unbroken run
    import argparse

    from safetensors.torch import load_file, save_file

    from nanoseek.options import add_options, make_config
    from nanoseek.train.sft import SFTConfig

    cfg, straight, _ = _tiny_sft(tmp_path, tok, "a", steps=4)
    parsed = add_options(argparse.ArgumentParser(), SFTConfig).parse_args(["--config", str(tmp_path / "a" /
                                                                                          "config.toml")])
    assert make_config(SFTConfig, parsed, required=()) == cfg     # (no --model: this run's model was passed in)
    _tiny_sft(tmp_path, tok, "b", steps=4, stop_after=2)
    ck = tmp_path / "b" / "ckpt" / "step-2"
    (tmp_path / "b" / "config.toml").unlink()
    t = load_file(ck / "trainer_state.safetensors")
    save_file({k.replace("optim/model.", "optim/"): v for k, v in t.items()}, ck / "trainer_state.safetensors",
              metadata={"format": "nanoseek-trainer-state-v1"})
    doc = json.loads((ck / "trainer_state.json").read_text())
    for g in doc["optimizer"]["param_groups"]:
        g["params"] = [p.removeprefix("model.") for p in g["params"]]
    doc["optimizer"]["scalars"] = {k.removeprefix("model."): v for k, v in doc["optimizer"]["scalars"].items()}
    doc["files"]["trainer_state.safetensors"] = (ck / "trainer_state.safetensors").stat().st_size
    (ck / "trainer_state.json").write_text(json.dumps(doc))
    assert any(k.startswith("optim/layers.") for k in load_file(ck / "trainer_state.safetensors"))
    _, resumed, _ = _tiny_sft(tmp_path, tok, "b", steps=4, resume=True)
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_r1_distill_style_template_trains_what_the_student_writes(tok):
    """R1-Distill's published templates open <think> in the generation prompt but render a finished assistant turn
    from its answer alone (the reasoning dropped). The trained text is then what the model writes after the prompt:
    reasoning, </think>, the answer, end of sentence; one example per turn (past turns render without reasoning)."""
    import copy
    from pathlib import Path

    student = copy.copy(tok)
    student.chat_template = (Path(__file__).parent / "data" / "r1_distill_style_chat_template.jinja").read_text()
    examples = render(student, CONV)
    assert len(examples) == 2
    for (ids, mask), turn in zip(examples, (2, 4)):
        prompt = student.apply_chat_template(CONV[:turn], add_generation_prompt=True, tokenize=False)
        assert prompt.endswith("<think>\n") and tok.decode([i for i, m in zip(ids, mask) if not m]) == prompt
        want = f"{CONV[turn]['reasoning_content']}\n</think>\n\n{CONV[turn]['content']}{Tokenizer.EOS}"
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == want
    # a template that neither extends its generation prompt nor opens <think> in it is still refused
    student.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                            "{% if add_generation_prompt %}assistant says: {% endif %}"
    with pytest.raises(UsageError, match="does not extend its generation prompt"):
        render(student, CONV)
