"""The founding claim: one 12 GB GPU serves AND tunes a 6.7B-class model, on the server's defaults.

In one process: a model of a real shape with random weights (OPT-6.7B, Llama-3-8B, or a small OPT
for the CPU) written as a Hugging Face folder layer by layer (never whole in memory), loaded int8
through the server's own loader (bitsandbytes quantizes each weight as it reaches the GPU), the
process's CUDA allocator capped at 12 GiB, the engine built as the server builds it (the memory
plan sizes its KV pool; no KV settings of the bench's own). It serves 32 requests, each with its own
adapter (soft prompts and prefixes of several lengths), alone, then again and again while a
prompt-tuning job trains at batch 4 x 256 tokens on the same model copy through the engine.

Reported: the memory plan, peak reserved memory and `mem_get_info` at the end (CUDA; peak RSS on
the CPU), serving tok/s alone and while training, training steps/s, whether outputs while
training equal those alone, errors, and (CUDA) the number of synchronizing CUDA calls per engine
step under `torch.cuda.set_sync_debug_mode("warn")`.

    python -m bench.gpu_node [--size 6.7b|8b|small] [--device cuda|cpu] [--train-steps 4]

`--size small --device cpu` runs the same path on the CPU (the test suite does). Last stdout line:
one JSON object.
"""

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

SIZES = {  # facebook/opt-6.7b's and meta-llama/Meta-Llama-3-8B's configs, and a small OPT
    "6.7b": ("opt", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                         word_embed_proj_dim=4096, vocab_size=50272, max_position_embeddings=2048)),
    "8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                         rope_theta=500000.0, rms_norm_eps=1e-5)),
    "small": ("opt", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                          word_embed_proj_dim=64, vocab_size=1000, max_position_embeddings=512)),
}
ADAPTERS, NEW_TOKENS, TRAIN_BATCH, TRAIN_TOKENS = 32, 32, 4, 256
CAP_GIB = 12.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_folder(folder: Path, size: str) -> None:
    """A random model of `size` as a Hugging Face folder (float16 safetensors, one shard per
    layer, made on the CPU one at a time), with a word-level tokenizer ("w0" ...) of its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, OPTConfig, PreTrainedTokenizerFast

    from bench.models import write_random_weights

    family, shape = SIZES[size]
    special = dict(pad_token_id=1, bos_token_id=2, eos_token_id=2)
    config = (OPTConfig(**shape, do_layer_norm_before=True, **special) if family == "opt"
              else LlamaConfig(**shape, **special, tie_word_embeddings=False))
    config.torch_dtype = "float16"
    write_random_weights(config, folder, torch.float16)
    config.save_pretrained(folder)
    vocab = {"<pad>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, config.vocab_size)} | {"w0": 0}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


class Memory:
    """Peak memory since start, in GiB: the CUDA allocator's reserved memory, or the process's RSS."""

    def __init__(self, device: torch.device):
        self.device = device

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_reserved(self.device) / 2**30
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 2**20

    def device_free_gib(self) -> float | None:
        return torch.cuda.mem_get_info(self.device)[0] / 2**30 if self.device.type == "cuda" else None


def requests_and_job(base):
    from app.datasets import Example
    from app.engine.requests import GenerationRequest, SoftPrompt
    from app.train_config import TrainConfig

    vocab, shape = base.model.config.vocab_size, base.kv_shape
    generator = torch.Generator().manual_seed(1)
    embed = base.model.get_input_embeddings()

    def words(count: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(4, vocab, (count,), generator=generator).tolist())

    def adapter(i: int):
        tokens = 8 + 2 * (i % 8)
        if i % 4 == 3:  # every fourth a prefix: each layer's keys and values
            kv = torch.randn((shape.layers, 2, tokens, shape.kv_heads, shape.head_dim), generator=generator)
            return SoftPrompt.prefix(kv, adapter_id=f"prefix-{i}")
        with torch.no_grad():
            return embed(torch.randint(4, vocab, (tokens,), generator=generator).to(base.device)).float().cpu()

    requests = [GenerationRequest(prompt_ids=base.tokenizer(words(32 + 4 * (i % 8))).input_ids,
                                  soft_prompt=adapter(i), max_new_tokens=NEW_TOKENS) for i in range(ADAPTERS)]
    # Rows of about TRAIN_TOKENS tokens: the soft prompt (20), the input, one output word and EOS.
    examples = [Example(words(TRAIN_TOKENS - 22), f"w{4 + i % 2}") for i in range(40)]
    return requests, examples, lambda steps: TrainConfig(
        num_virtual_tokens=20, batch_size=TRAIN_BATCH, max_length=TRAIN_TOKENS, max_steps=steps,
        eval_every=1_000_000, init="vocab")


async def serve_and_train(base, train_steps: int) -> dict:
    from app.config import Settings
    from app.engine.engine import Engine
    from app.runtime import planned_core
    from worker.training import train_adapter

    settings = Settings()  # the server's defaults: the memory plan sizes the pool
    requests, examples, config = requests_and_job(base)
    engine = Engine(lambda: planned_core(base, settings, serves=True, trains=True), settings.max_queue_size,
                    1 << 30, train_step_budget_s=settings.train_step_budget_s)
    engine.start()
    errors: list[str] = []
    try:
        started = time.perf_counter()
        alone = await engine.submit_all(requests, 3600)
        alone_s = time.perf_counter() - started
        tokens = sum(len(c.result.token_ids) for c in alone)
        log(f"served {ADAPTERS} adapters alone: {tokens / alone_s:.1f} tok/s; training {train_steps} steps of "
            f"{TRAIN_BATCH} x {TRAIN_TOKENS} beside them")
        outcome: list = []

        def train() -> None:
            try:
                outcome.append(train_adapter(base, config(train_steps), examples, None, device=engine))
            except Exception as exc:  # reported, not raised: the figure says what failed
                errors.append(f"training: {type(exc).__name__}: {exc}")

        steps_before = engine.core.steps
        trainer = threading.Thread(target=train)
        training_started = time.perf_counter()
        trainer.start()
        served, batches, same = 0, 0, True
        while trainer.is_alive():
            try:
                during = await engine.submit_all(requests, 3600)
            except Exception as exc:
                errors.append(f"serving: {type(exc).__name__}: {exc}")
                break
            batches += 1
            served += sum(len(c.result.token_ids) for c in during)
            same &= [c.result.token_ids for c in during] == [c.result.token_ids for c in alone]
        await asyncio.to_thread(trainer.join)
        training_s = time.perf_counter() - training_started
        plan = engine.core.memory_plan.as_dict()
        steps = engine.core.steps
    finally:
        await engine.stop()
    return {
        "memory_plan": plan, "serving_tok_s_alone": round(tokens / alone_s, 2),
        "serving_tok_s_while_training": round(served / training_s, 2),
        "train_steps_done": outcome[0].steps if outcome else 0,
        "train_steps_per_s": round(outcome[0].steps / training_s, 3) if outcome else 0.0,
        "batches_served_while_training": batches, "outputs_while_training_equal_alone": same,
        "training_items": engine.training_items, "engine_steps": steps, "engine_steps_while_training": steps - steps_before,
        "errors": errors, "dtype_errors": [e for e in errors if "scalar type" in e or "dtype" in e.lower()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="6.7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-steps", type=int, default=4)
    args = parser.parse_args()
    from app.engine.loader import load_base_model

    device = torch.device(args.device)
    started = time.perf_counter()
    if device.type == "cuda":  # a 12 GB consumer card, on whatever GPU this is
        torch.cuda.set_per_process_memory_fraction(CAP_GIB * 2**30 / torch.cuda.get_device_properties(device).total_memory)
    with tempfile.TemporaryDirectory(prefix="gpu-node-") as tmp:
        folder = Path(tmp) / f"{args.size}-random"
        folder.mkdir()
        log(f"writing a random {SIZES[args.size][0]} of size {args.size}...")
        build_folder(folder, args.size)
        base = load_base_model(folder, Path(tmp) / "cache", quantization="int8", device=str(device))
    parameters = sum(p.numel() for p in base.model.parameters())
    log(f"loaded int8 on {device}: {parameters / 1e9:.2f}B parameters, computing in {base.embed_dtype}")
    memory = Memory(base.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        result = asyncio.run(serve_and_train(base, args.train_steps))
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    print(json.dumps({
        "size": args.size, "family": SIZES[args.size][0], "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "parameters": parameters, "quantization": "int8", "compute_dtype": str(base.embed_dtype).removeprefix("torch."),
        "cap_gib": CAP_GIB if device.type == "cuda" else None, "peak_gib": round(memory.peak_gib(), 3),
        "peak_kind": "cuda_max_memory_reserved" if device.type == "cuda" else "peak_rss",
        "device_free_gib_at_end": memory.device_free_gib(), **result,
        "sync_warnings": syncs if device.type == "cuda" else None,
        "sync_warnings_per_step": round(syncs / max(result["engine_steps"], 1), 2) if device.type == "cuda" else None,
        "target_met": (memory.peak_gib() <= CAP_GIB and not result["errors"] and result["train_steps_done"] > 0)
        if device.type == "cuda" else None,
        "seconds": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
