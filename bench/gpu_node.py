"""The motivating claim: one consumer GPU serves AND tunes a 6.7B model.

In one process: an OPT-6.7B-shaped model built from its config with random weights (no download),
loaded int8 with bitsandbytes through the server's own loader; the engine serves a mixed batch of
8 adapters (random soft prompts of different lengths) alone, then again and again while a
prompt-tuning job trains on the same model copy through the engine, at batch 4 x 256 tokens.
Reported: peak memory while serving alone and while serving during training (CUDA:
torch.cuda.max_memory_allocated, target under 12 GB, the consumer card of the motivating case;
CPU: the process's peak RSS), and any dtype error raised on the way (int8 with a fused RMSNorm
in half precision is known to fail with "expected scalar type Float but found Half").

    python -m bench.gpu_node [--size 6.7b|small] [--device cuda|cpu] [--train-steps 3]

`--size small` runs the same path on a small config (the tests use it on the CPU). Last stdout
line: one JSON object.
"""

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import torch

SIZES = {  # facebook/opt-6.7b's config, and a small one of the same family
    "6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                 word_embed_proj_dim=4096, vocab_size=50272, max_position_embeddings=2048),
    "small": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                  word_embed_proj_dim=64, vocab_size=1000, max_position_embeddings=512),
}
ADAPTERS, NEW_TOKENS, TRAIN_BATCH, TRAIN_TOKENS = 8, 32, 4, 256
TARGET_GB = 12.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_folder(folder: Path, size: str, device: torch.device) -> None:
    """A random OPT of `size` saved as a Hugging Face folder, with a word-level tokenizer of the
    same vocabulary size ("w0" ... ): built on `device`, in fp16 there (fp32 on the CPU)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    config = OPTConfig(**SIZES[size], do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = OPTForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    vocab = {"<pad>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, config.vocab_size)} | {"w0": 0}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak memory since the last reset, in GB: CUDA allocations, or the process's RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 2**20


async def serve_and_train(base, train_steps: int, memory: PeakMemory) -> dict:
    from app.datasets import Example
    from app.engine.core import EngineCore
    from app.engine.engine import Engine
    from app.engine.requests import GenerationRequest
    from app.train_config import TrainConfig
    from worker.training import train_prompt

    vocab = base.model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    embed = base.model.get_input_embeddings()

    def soft_prompt(tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return embed(torch.randint(4, vocab, (tokens,), generator=generator).to(base.device)).float().cpu()

    def words(count: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(4, vocab, (count,), generator=generator).tolist())

    requests = [GenerationRequest(prompt_ids=base.tokenizer(words(32 + 4 * i)).input_ids,
                                  soft_prompt=soft_prompt(8 + 2 * i), max_new_tokens=NEW_TOKENS)
                for i in range(ADAPTERS)]
    # Rows of about TRAIN_TOKENS tokens: the soft prompt (20), the input, one output word and EOS.
    examples = [Example(words(TRAIN_TOKENS - 22), f"w{4 + i % 2}") for i in range(40)]
    config = TrainConfig(num_virtual_tokens=20, batch_size=TRAIN_BATCH, max_length=TRAIN_TOKENS, max_steps=train_steps,
                         eval_every=1_000_000, init="vocab")
    # KV for the batch (8 rows of at most 20 + 60 + 32 positions) and the evaluation, not more:
    # at 6.7B a position costs 0.5 MB.
    engine = Engine(partial(EngineCore, base, kv_tokens=2048, max_rows=16), 64, 1 << 20, train_step_budget_s=0.25)
    engine.start()
    errors: list[str] = []
    try:
        memory.reset()
        alone = await engine.submit_all(requests, 3600)
        serving_gb = memory.peak_gb()
        log(f"serving alone: {serving_gb:.2f} GB; training {train_steps} steps of {TRAIN_BATCH} x {TRAIN_TOKENS} beside it")
        memory.reset()
        outcome: list = []

        def train() -> None:
            try:
                outcome.append(train_prompt(base, config, examples, None, device=engine))
            except Exception as exc:  # reported, not raised: the figure says what failed
                errors.append(f"training: {type(exc).__name__}: {exc}")

        trainer = threading.Thread(target=train)
        trainer.start()
        batches, same = 0, True
        while trainer.is_alive():
            try:
                during = await engine.submit_all(requests, 3600)
                batches += 1
                same &= [c.result.token_ids for c in during] == [c.result.token_ids for c in alone]
            except Exception as exc:
                errors.append(f"serving: {type(exc).__name__}: {exc}")
                break
        await asyncio.to_thread(trainer.join)
        training_gb = memory.peak_gb()
    finally:
        await engine.stop()
    return {
        "serving_peak_gb": round(serving_gb, 3), "serving_while_training_peak_gb": round(training_gb, 3),
        "train_steps_done": outcome[0].steps if outcome else 0, "batches_served_while_training": batches,
        "outputs_while_training_equal_alone": same, "training_items": engine.training_items, "errors": errors,
        "dtype_errors": [e for e in errors if "scalar type" in e or "dtype" in e.lower()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="6.7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args()
    from app.engine.loader import load_base_model

    device = torch.device(args.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-node-") as tmp:
        folder = Path(tmp) / f"opt-{args.size}-random"
        log(f"building a random OPT-{args.size} on {device}...")
        build_folder(folder, args.size, device)
        base = load_base_model(folder, Path(tmp) / "cache", quantization="int8", device=str(device))
    parameters = sum(p.numel() for p in base.model.parameters())
    log(f"loaded int8: {parameters / 1e9:.2f}B parameters; serving {ADAPTERS} adapters...")
    memory = PeakMemory(device)
    result = asyncio.run(serve_and_train(base, args.train_steps, memory))
    print(json.dumps({
        "size": args.size, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "parameters": parameters, "quantization": "int8", "memory": memory.kind, **result,
        "target_gb": TARGET_GB if device.type == "cuda" else None,
        "target_met": (result["serving_while_training_peak_gb"] < TARGET_GB and not result["errors"])
        if device.type == "cuda" else None,
        "seconds": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
