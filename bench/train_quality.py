"""How much prompt or prefix tuning buys: zero-shot vs tuned exact-match accuracy on a real task.

Trains with the job's own loop and default hyperparameters (app.train_config.TrainConfig) per
method (`--method both`: one after the other, each with the whole budget) on
../shared/datasets/TASK/train.jsonl, within a time budget, choosing the best prompt on a
held-out slice of train. Then evaluates the base model zero-shot (choosing the likeliest label) and the tuned prompt (its
greedy generation must equal the label) on the validation file (or --eval-file), which
training never saw.

    python -m bench.train_quality --task sst2|agnews [--method prompt_tuning|prefix_tuning|both]
        [--prefix-projection] [--lr-schedule constant|linear] [--minutes 15] [--eval-file PATH]
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import get_args

from app.config import Settings
from app.datasets import read_jsonl
from app.engine.loader import load_base_model
from app.train_config import Schedule, TrainConfig
from worker.training import (
    Hooks,
    exact_match_accuracy,
    label_choice_accuracy,
    train_adapter,
)

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
TEMPLATES = {
    "sst2": "Review: {input}\nSentiment:",
    "agnews": "Article: {input}\nTopic:",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TEMPLATES), required=True)
    parser.add_argument("--method", choices=["prompt_tuning", "prefix_tuning", "both"], default="prompt_tuning")
    parser.add_argument("--prefix-projection", action="store_true", help="prefix tuning through PEFT's MLP")
    parser.add_argument("--lr-schedule", choices=get_args(Schedule), default=TrainConfig.model_fields["lr_schedule"].default,
                        help="linear: the rate falls to zero by the end of the time budget")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget per method")
    parser.add_argument("--eval-file", type=Path, help="JSONL to evaluate on (default: the task's validation file)")
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    args = parser.parse_args()

    eval_file = args.eval_file or args.datasets / args.task / "validation.jsonl"
    train = read_jsonl(args.datasets / args.task / "train.jsonl")
    evaluation = read_jsonl(eval_file)
    settings = Settings()
    base = load_base_model(settings.base_model, settings.model_cache_dir, settings.quantization, settings.device,
                           settings.llm_int8_threshold, settings.int8_packed_weights)
    template, max_length = TEMPLATES[args.task], TrainConfig.model_fields["max_length"].default

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log(f"zero-shot on {len(evaluation)} examples from {eval_file}...")
    zero_shot = label_choice_accuracy(base, None, evaluation, template, max_length)
    zero_shot_generated = exact_match_accuracy(base, None, evaluation, template, max_length)
    log(f"zero-shot: likeliest label {zero_shot:.3f}, generated exact match {zero_shot_generated:.3f}")

    def tune(method: str) -> dict:
        config = TrainConfig(method=method, prefix_projection=method == "prefix_tuning" and args.prefix_projection,
                             lr_schedule=args.lr_schedule, template=template, max_steps=1_000_000,
                             time_budget_s=args.minutes * 60)
        log(f"{method}: training for up to {args.minutes} minutes...")
        started = time.perf_counter()
        hooks = Hooks(
            on_step=lambda step, total, epoch, loss: step % 20 == 0 and log(
                f"step {step} epoch {epoch:.2f} loss {loss:.3f} ({time.perf_counter() - started:.0f}s)"),
            on_eval=lambda step, loss, accuracy: log(f"  eval at step {step}: loss {loss:.3f} accuracy {accuracy:.3f}"),
        )
        result = train_adapter(base, config, train, None, hooks)
        minutes = (time.perf_counter() - started) / 60
        log(f"trained {result.steps} steps in {minutes:.1f} min (best at step {result.best_step}); evaluating...")
        tuned = exact_match_accuracy(base, result.learned, evaluation, template, max_length)
        log(f"{method}: tuned exact match {tuned:.3f}")
        return {
            # the adapter's free greedy generation must equal the label exactly (the stricter test)
            "tuned_accuracy": round(tuned, 4),
            "tuned_label_choice_accuracy": round(label_choice_accuracy(base, result.learned, evaluation, template,
                                                                       max_length), 4),
            "train_examples": result.train_examples, "steps": result.steps,
            "minutes": round(minutes, 2), "best_step": result.best_step, "stopped_early": result.stopped_early,
            "hyperparameters": {k: v for k, v in config.to_dict().items() if k not in ("max_steps", "time_budget_s")},
        }

    methods = ["prompt_tuning", "prefix_tuning"] if args.method == "both" else [args.method]
    results = {method: tune(method) for method in methods}
    best = max(results, key=lambda m: results[m]["tuned_accuracy"])
    print(json.dumps({
        "task": args.task, "eval_file": str(eval_file), "model": base.name, "quantization": base.quantization,
        # zero-shot: the base model picks the likeliest label (free generation rarely says a label at all)
        "zero_shot_accuracy": round(zero_shot, 4), "zero_shot_generated_exact_match": round(zero_shot_generated, 4),
        "methods": results, "best_method": best, "tuned_accuracy": results[best]["tuned_accuracy"],
    }))


if __name__ == "__main__":
    main()
