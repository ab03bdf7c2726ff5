"""Peak memory of one prompt- or prefix-tuning step against one inference forward, same batch and length.

Each side runs in its own subprocess with the default int8 model. On CPU the figure is the
process's peak resident memory (VmHWM) reset after the model has loaded, so loading does not
count; on CUDA it is torch.cuda.max_memory_allocated. This is the product's reason to exist:
with the model frozen, tuning a soft prompt should cost barely more memory than serving.

    python -m bench.train_memory [--batch-size 8] [--seq-len 128] [--method prompt_tuning|prefix_tuning]
        [--prefix-projection]

The training side is the job's own: its trainable (for prefix tuning with projection, PEFT's MLP)
and its optimizer, whose state is counted.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from app.config import Settings
from app.engine.loader import load_base_model
from app.engine.model_view import training_view
from app.train_config import TrainConfig
from worker.training import Row, Trainable, make_optimizer, target_losses, wants_checkpointing

NUM_VIRTUAL_TOKENS = 20
TARGET_TOKENS = 2  # a label and EOS, as in classification tuning


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status").read_text()
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kb / 1024


def measure(mode: str, batch_size: int, seq_len: int, checkpointing: bool, config: TrainConfig) -> dict:
    settings = Settings()
    base = load_base_model(settings.base_model, settings.model_cache_dir, settings.quantization, settings.device,
                           settings.llm_int8_threshold, settings.int8_packed_weights)
    generator = torch.Generator().manual_seed(0)
    text_len = seq_len - NUM_VIRTUAL_TOKENS  # the soft prompt counts towards the sequence length
    batch = [
        Row.of(torch.randint(10, 20_000, (text_len - TARGET_TOKENS,), generator=generator).tolist(),
               torch.randint(10, 20_000, (TARGET_TOKENS,), generator=generator).tolist())
        for _ in range(batch_size)
    ]
    trainable = Trainable(base, config, []).to(base.device)
    _reset_peak(base.device)
    if mode == "training":
        optimizer = make_optimizer(trainable, config)
        started = time.perf_counter()
        target_losses(base, trainable(), batch, training_view(base.model, checkpointing)).mean().backward()
        optimizer.step()
        seconds = time.perf_counter() - started
    else:  # serving the same batch with a soft prompt of the same length
        embed = base.model.get_input_embeddings()
        prompt = embed(torch.arange(NUM_VIRTUAL_TOKENS, device=base.device))
        started = time.perf_counter()
        with torch.inference_mode():
            ids = torch.tensor([row.ids for row in batch], device=base.device)
            soft = prompt.to(base.embed_dtype).unsqueeze(0).expand(batch_size, -1, -1)
            base.model(inputs_embeds=torch.cat([soft, embed(ids)], dim=1), use_cache=True, logits_to_keep=1)
        seconds = time.perf_counter() - started
    return {"peak_mb": round(_peak_mb(base.device), 1), "seconds": round(seconds, 3), "model": base.name,
            "quantization": base.quantization, "device": str(base.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="auto, as training jobs do by default: on for batches of 512+ tokens")
    parser.add_argument("--method", choices=["prompt_tuning", "prefix_tuning"], default="prompt_tuning")
    parser.add_argument("--prefix-projection", action="store_true", help="prefix tuning through PEFT's MLP")
    parser.add_argument("--measure", choices=["inference", "training"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = TrainConfig(method=args.method, prefix_projection=args.prefix_projection,
                         num_virtual_tokens=NUM_VIRTUAL_TOKENS, init="vocab")
    setting = {"auto": None, "on": True, "off": False}[args.gradient_checkpointing]
    checkpointing = wants_checkpointing(setting, [Row.of([0] * (args.seq_len - NUM_VIRTUAL_TOKENS), [])] * args.batch_size,
                                        NUM_VIRTUAL_TOKENS)
    if args.measure:  # child process: one side only
        print(json.dumps(measure(args.measure, args.batch_size, args.seq_len, checkpointing, config)))
        return
    results = {}
    for mode in ("inference", "training"):
        print(f"measuring {mode} in a fresh process...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, "-m", "bench.train_memory", "--measure", mode, "--batch-size", str(args.batch_size),
             "--seq-len", str(args.seq_len), "--gradient-checkpointing", "on" if checkpointing else "off",
             "--method", args.method, *(["--prefix-projection"] if args.prefix_projection else [])],
            check=True, capture_output=True, text=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    inference, training = results["inference"]["peak_mb"], results["training"]["peak_mb"]
    print(json.dumps({
        "model": results["training"]["model"], "quantization": results["training"]["quantization"],
        "device": results["training"]["device"], "batch_size": args.batch_size, "seq_len": args.seq_len,
        "method": args.method, "prefix_projection": args.prefix_projection,
        "peak_mb_inference": inference, "peak_mb_training": training,
        "training_vs_inference": round(training / inference, 3), "gradient_checkpointing": checkpointing,
        "seconds_inference_forward": results["inference"]["seconds"], "seconds_training_step": results["training"]["seconds"],
    }))


if __name__ == "__main__":
    main()
