"""Throughput of one mixed-adapter batch against one shared adapter and against HF PEFT.

On the default model (int8, CPU), greedy decoding of N SST-2 reviews ("Review: ...\nSentiment:",
different lengths) for up to `--new-tokens` tokens each, measured in completion tokens actually
generated (a row stops early at EOS) per second of wall time:

  (a) mixed:  one `generate_batch` call, every request with its own adapter (random soft prompts
              of 8..20 virtual tokens drawn from the vocabulary's embeddings);
  (b) single: the same batch, every request using adapter 0;
  (c) peft:   one `PeftModel` holding all adapters, `set_adapter` + `generate()` per request.
              PEFT's cached generate with prompt tuning gives wrong tokens after the first on
              this peft/transformers pair, so it runs with `use_cache=False`; whether the cached
              path agrees with the reference is measured on a few requests and reported.

Rows of run (a) are checked against the no-cache reference decode (`check_against_reference`).
PEFT wraps the base model in place, so (c) runs last. The last stdout line is one JSON object.

    python -m bench.mixed_batch [--requests 32] [--new-tokens 32] [--peft-requests N]
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from app.config import Settings
from app.engine.generation import generate_batch
from app.engine.loader import BaseModel, load_base_model
from app.engine.reference import check_against_reference, reference_greedy_decode
from app.engine.requests import GenerationRequest, stop_token_ids

SST2_VALIDATION = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sst2" / "validation.jsonl"
MIN_VIRTUAL_TOKENS, MAX_VIRTUAL_TOKENS = 8, 20
TIE_TOLERANCE = 1.0  # int8 near-tie tolerance, as in tests/conftest.py


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="requests, each with its own adapter")
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens per request")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of (a) and (b), interleaved; best counts")
    parser.add_argument("--reference-rows", type=int, default=8, help="rows of (a) checked against the reference")
    parser.add_argument("--peft-requests", type=int, default=None, help="requests timed for (c) (default: all)")
    parser.add_argument("--peft-cached-rows", type=int, default=2, help="requests checked with PEFT use_cache=True")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None,
                        help="a Hugging Face model folder or a packaged model name (default: BASE_MODEL, else Gemma 3 270M)")
    return parser.parse_args()


def load_prompts(base: BaseModel, count: int) -> list[list[int]]:
    lines = SST2_VALIDATION.read_text().splitlines()[:count]
    texts = [f"Review: {json.loads(line)['input']}\nSentiment:" for line in lines]
    return [base.tokenizer(text).input_ids for text in texts]


def random_soft_prompts(base: BaseModel, count: int, seed: int) -> list[torch.Tensor]:
    """Soft prompts of 8..20 virtual tokens, each the embeddings of random vocabulary tokens."""
    generator = torch.Generator().manual_seed(seed)
    embed = base.model.get_input_embeddings()
    prompts = []
    with torch.inference_mode():
        for _ in range(count):
            length = int(torch.randint(MIN_VIRTUAL_TOKENS, MAX_VIRTUAL_TOKENS + 1, (1,), generator=generator))
            ids = torch.randint(0, base.model.config.vocab_size, (length,), generator=generator)
            prompts.append(embed(ids.to(base.device)).float().cpu())
    return prompts


def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    """Run `fn` (which returns generated token lists); return (tokens per second, its tokens)."""
    start = time.perf_counter()
    with torch.inference_mode():
        tokens = fn()
    elapsed = time.perf_counter() - start
    return sum(len(t) for t in tokens) / elapsed, tokens


def engine_run(base: BaseModel, prompts: list[list[int]], soft_prompts: list[torch.Tensor], new_tokens: int):
    requests = [GenerationRequest(ids, soft, new_tokens) for ids, soft in zip(prompts, soft_prompts)]
    return lambda: [r.token_ids for r in generate_batch(base, requests)]


def check_rows(base, prompts, soft_prompts, tokens, new_tokens: int, rows: int) -> dict:
    checks = []
    for i in range(rows):
        checks.append(check_against_reference(base, soft_prompts[i], prompts[i], tokens[i], new_tokens, TIE_TOLERANCE))
        log(f"  reference row {i}: exact={checks[-1].exact} agrees={checks[-1].agrees} "
            f"diverged_at={checks[-1].diverged_at} margin={checks[-1].margin}")
    return {
        "outputs_match_reference": all(c.agrees for c in checks),
        "exact_match_rows": sum(c.exact for c in checks),
        "reference_rows_checked": rows,
        "tie_tolerance": TIE_TOLERANCE,
    }


def build_peft(base: BaseModel, soft_prompts: list[torch.Tensor]):
    """One PeftModel on the resident base model, holding every soft prompt as adapter `a{i}`."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model = None
    for i, soft in enumerate(soft_prompts):
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=soft.shape[0], token_dim=base.hidden_size
        )
        if model is None:
            model = get_peft_model(base.model, config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
        with torch.no_grad():
            model.prompt_encoder[f"a{i}"].embedding.weight.copy_(soft)
    return model.eval()


def peft_generate(model, base: BaseModel, adapter: int, prompt: list[int], new_tokens: int, use_cache: bool):
    """Greedy new tokens of one request through PEFT, cut before the first stop token."""
    model.set_adapter(f"a{adapter}")
    input_ids = torch.tensor([prompt], device=base.device)
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
    )
    generated = out[0, len(prompt):].tolist()
    eos_ids = stop_token_ids(base)
    return generated[: next((i for i, t in enumerate(generated) if t in eos_ids), len(generated))]


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]  # other work on the machine skews every rate below
    settings = Settings()
    base = load_base_model(args.model or settings.base_model, settings.model_cache_dir, "int8", "cpu")
    prompts = load_prompts(base, args.requests)
    soft_prompts = random_soft_prompts(base, args.requests, args.seed)
    log(f"loaded {base.name}; prompt lengths {[len(p) for p in prompts]}; "
        f"virtual tokens {[len(s) for s in soft_prompts]}")

    timed(engine_run(base, prompts[:2], soft_prompts[:2], 4))  # warm-up
    mixed = engine_run(base, prompts, soft_prompts, args.new_tokens)
    single = engine_run(base, prompts, [soft_prompts[0]] * args.requests, args.new_tokens)
    tok_s_mixed = tok_s_single = 0.0
    for repeat in range(max(args.repeats, 1)):
        rate, mixed_tokens = timed(mixed)
        tok_s_mixed = max(tok_s_mixed, rate)
        log(f"(a) mixed, run {repeat}: {rate:.1f} tok/s")
        rate, _ = timed(single)
        tok_s_single = max(tok_s_single, rate)
        log(f"(b) single adapter, run {repeat}: {rate:.1f} tok/s")

    log(f"checking up to {args.reference_rows} rows of (a) against the reference decode")
    reference_rows = min(args.reference_rows, args.requests)
    reference = check_rows(base, prompts, soft_prompts, mixed_tokens, args.new_tokens, reference_rows)

    peft_rows = min(args.peft_requests or args.requests, args.requests)
    peft = build_peft(base, soft_prompts)
    with torch.inference_mode():
        peft_generate(peft, base, 0, prompts[0], 2, use_cache=False)  # warm-up
    tok_s_peft, peft_tokens = timed(
        lambda: [peft_generate(peft, base, i, prompts[i], args.new_tokens, False) for i in range(peft_rows)]
    )
    log(f"(c) PEFT sequential, use_cache=False, {peft_rows} requests: {tok_s_peft:.1f} tok/s")

    cached_rows = range(min(args.peft_cached_rows, args.requests))
    with torch.inference_mode():
        cached_ok = [
            peft_generate(peft, base, i, prompts[i], args.new_tokens, True)
            == reference_greedy_decode(base, soft_prompts[i], prompts[i], args.new_tokens)
            for i in cached_rows
        ]
    log(f"PEFT use_cache=True matches reference: {cached_ok}")

    result = {
        "model": base.name,
        "quantization": base.quantization,
        "requests": args.requests,
        "adapters": len(soft_prompts),
        "new_tokens": args.new_tokens,
        "tok_s_mixed": round(tok_s_mixed, 2),
        "tok_s_single_adapter": round(tok_s_single, 2),
        "tok_s_peft_sequential": round(tok_s_peft, 2),
        "mixed_vs_single": round(tok_s_mixed / tok_s_single, 3),
        "mixed_vs_peft": round(tok_s_mixed / tok_s_peft, 2),
        **reference,
        "completion_tokens_mixed": sum(len(t) for t in mixed_tokens),
        "peft_use_cache": False,
        "peft_requests_timed": peft_rows,
        "peft_rows_matching_engine": sum(p == m for p, m in zip(peft_tokens, mixed_tokens)),
        "peft_cached_matches_reference": all(cached_ok),
        "peft_cached_rows_checked": len(cached_ok),
        "timing_repeats": max(args.repeats, 1),
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "total_runtime_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
