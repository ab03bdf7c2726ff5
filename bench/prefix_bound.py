"""How much of a newcomer's first engine step the prefix cache can save, on serve_load's workload.

serve_load's target asks the prefix cache to halve time to first token. The first token comes out
of the step that admits the request; this measures that step in-process on the default model
(int8, CPU), for one row alone and beside `--running` decoding rows:

  cold    nothing cached: soft prompt (20 virtual tokens) and prompt all computed
  cached  the adapter's prefix cached by an earlier request with another review (soft prompt
          and "Review:" read from the cache: what serve_load's traffic can share)
  floor   the same row's next step, one token and nothing to prefill: no prefix cache can make
          a step cost less than this

Prompts: SST-2 reviews in serve_load's template; adapters: random soft prompts as serve_load
makes them. The cache cannot remove what follows the shared prefix (the review itself), so the
best any prefix cache can do is `ideal_cached`: the floor plus the cold step's prefill share for
only the positions left to compute (prefill cost taken as proportional to positions).
`ideal_cached_vs_cold` > 0.5 means no prefix cache can halve the first step on this workload
here, so none can halve time to first token (the rest of it, HTTP and queueing, does not shrink).

    python -m bench.prefix_bound [--prompts 24] [--running 0,1,2]

The last stdout line is one JSON object.
"""

import argparse
import json
import statistics
import sys
import time

import torch

from app.config import Settings
from app.engine.core import EngineCore
from app.engine.loader import load_base_model
from app.engine.requests import GenerationRequest, SoftPrompt
from bench.serve_load import SST2, TEMPLATE, VIRTUAL_TOKENS

KV_TOKENS = 8192


def timed_step(core: EngineCore) -> float:
    started = time.perf_counter()
    core.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--running", default="0,1,2", help="decoding rows beside the newcomer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = Settings()
    base = load_base_model(settings.base_model, settings.model_cache_dir)
    generator = torch.Generator().manual_seed(args.seed)
    embed = base.model.get_input_embeddings()
    with torch.inference_mode():
        ids = torch.randint(0, embed.num_embeddings, (4, VIRTUAL_TOKENS), generator=generator)
        adapters = [SoftPrompt(embed(row).clone(), f"adapter-{i}") for i, row in enumerate(ids)]
    reviews = [json.loads(line)["input"] for line in SST2.read_text().splitlines()]
    picks = torch.randperm(len(reviews), generator=generator)[: 2 * args.prompts].tolist()
    prompts = [base.tokenizer(TEMPLATE.format(input=reviews[i])).input_ids for i in picks]

    def request(prompt: list[int], adapter: int, tokens: int) -> GenerationRequest:
        return GenerationRequest(prompt, adapters[adapter], tokens)

    results = {}
    for running in [int(r) for r in args.running.split(",")]:
        cores = {"cold": EngineCore(base, KV_TOKENS, max_rows=8, prefix_cache_tokens=0),
                 "cached": EngineCore(base, KV_TOKENS, max_rows=8)}
        for core in cores.values():  # decoding rows that outlive the measurement, and a warm-up
            for i in range(running):
                core.add(request(prompts[-1 - i], i % len(adapters), 500))
            core.step()
        times: dict[str, list[float]] = {"cold": [], "cached": [], "floor": []}
        computed: dict[str, list[int]] = {"cold": [], "cached": []}
        for n in range(args.prompts):
            adapter = n % len(adapters)
            for name, core in cores.items():
                if name == "cached":  # another review of this adapter puts its prefix in the cache
                    core.add(request(prompts[args.prompts + n], adapter, 1))
                    core.step()
                row = core.add(request(prompts[n], adapter, 2))
                times[name].append(timed_step(core))
                computed[name].append(row.num_prompt_positions - row.num_shared_positions)
                if name == "cold":
                    times["floor"].append(timed_step(core))
                else:
                    core.step()
        medians = {name: statistics.median(values) for name, values in times.items()}
        left = statistics.mean(computed["cached"]) / statistics.mean(computed["cold"])
        medians["ideal_cached"] = medians["floor"] + (medians["cold"] - medians["floor"]) * left
        results[f"running_{running}"] = {
            **{f"{name}_ms": round(1000 * value, 2) for name, value in medians.items()},
            "cold_positions_computed": round(statistics.mean(computed["cold"]), 1),
            "cached_positions_computed": round(statistics.mean(computed["cached"]), 1),
            "cached_vs_cold": round(medians["cached"] / medians["cold"], 3),
            "ideal_cached_vs_cold": round(medians["ideal_cached"] / medians["cold"], 3),
        }
        print(f"{running} running: {results[f'running_{running}']}", file=sys.stderr, flush=True)
    halving_possible = any(r["ideal_cached_vs_cold"] <= 0.5 for r in results.values())
    print(json.dumps({"model": base.name, "virtual_tokens": VIRTUAL_TOKENS, "prompts": args.prompts, **results,
                      "a_cache_could_halve_the_first_step": halving_possible}))


if __name__ == "__main__":
    main()
