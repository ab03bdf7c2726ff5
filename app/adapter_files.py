"""Soft-prompt adapters in PEFT's file format: parse and validate uploads, encode and read files.

An adapter is `adapter_config.json` (peft_type PROMPT_TUNING) plus `adapter_model.safetensors`
holding one tensor, `prompt_embeddings` [num_virtual_tokens, hidden]. We record the base-model
fingerprint in the safetensors metadata, which PEFT ignores, so files move freely both ways.
Only safetensors is ever parsed: nothing uploaded goes near pickle.

PEFT's other soft-prompt kinds that serve as a fixed soft prompt are imported too, and keep their
own files for download beside the soft prompt served (SOFT_PROMPT_NAME):
- P_TUNING: PEFT saves the prompt encoder's output, not the encoder, as `prompt_embeddings`
  (its inference mode reads that tensor as is): the soft prompt itself.
- MULTITASK_PROMPT_TUNING: a shared prompt and low-rank task factors; task t's prompt is
  `prompt_embeddings * (prefix_task_cols[t] @ prefix_task_rows[t])`, made once at import.

PREFIX_TUNING adapters give every layer keys and values instead of input embeddings: PEFT saves
them (its reparameterization MLP already applied) as `prompt_embeddings`
[num_virtual_tokens, layers * 2 * kv_heads * head_dim]. That tensor is served as it is stored
(app.engine.prefix_kv reads its layout), so such an adapter's files are its own.
"""

import hashlib
import io
import json
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from app.engine import prefix_kv
from app.engine.kv_cache import KVShape

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TENSOR_NAME = "prompt_embeddings"
SOFT_PROMPT_NAME = "soft_prompt.safetensors"  # the prompt served, beside another kind's own files
PROMPT_TUNING, P_TUNING, MULTITASK = "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"
PREFIX_TUNING = "PREFIX_TUNING"
PEFT_TYPES = (PROMPT_TUNING, P_TUNING, MULTITASK, PREFIX_TUNING)
TASK_TENSORS = ("prefix_task_cols", "prefix_task_rows")
FINGERPRINT_KEY = "softserve_base_fingerprint"
FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32}


class AdapterFormatError(ValueError):
    """The upload is not a valid adapter; the message says which part and why."""


class BaseModelMismatch(ValueError):
    """The adapter was made for a different base model."""


@dataclass
class ParsedAdapter:
    # float32, what is served: [num_virtual_tokens, hidden] (a soft prompt) or, for PREFIX_TUNING,
    # [num_virtual_tokens, layers * 2 * kv_heads * head_dim] (keys and values)
    prompt_embeddings: torch.Tensor
    base_fingerprint: str
    base_model_name: str
    original_files: dict[str, bytes] | None = None  # another kind's own files, kept for download


# An adapter zip holds two files, perhaps in a folder with a README; far more is an attack.
MAX_ZIP_MEMBERS = 100
MAX_ZIP_DIRECTORY_BYTES = 64 * 1024  # the central directory: ~46 bytes plus the name per member
# zipfile bounds what one read(n) inflates only for deflate; LZMA and bzip2 would inflate a whole
# member at once, so an adapter zip may only store or deflate.
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}


def _check_zip_directory(data: bytes) -> None:
    """Refuse a zip with too many members from its end record, before zipfile builds an object per
    member: a few MB of central directory can list 300,000 of them."""
    end = data.rfind(b"PK\x05\x06", -(22 + 0xFFFF))  # the end record, before a comment of up to 64 kB
    if end < 0 or len(data) - end < 22:
        raise AdapterFormatError("archive: not a valid zip file")
    if data[max(0, end - 20) : end].startswith(b"PK\x06\x07"):  # zip64 records override the sizes
        raise AdapterFormatError("archive: zip64 archives are not supported")
    members, directory_bytes = struct.unpack_from("<HI", data, end + 10)
    if members > MAX_ZIP_MEMBERS or directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise AdapterFormatError(
            f"archive: lists {members} members in {directory_bytes} bytes; at most {MAX_ZIP_MEMBERS} members "
            f"and {MAX_ZIP_DIRECTORY_BYTES} bytes allowed"
        )


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> bytes:
    name = Path(info.filename).name
    if info.flag_bits & 0x1:
        raise AdapterFormatError(f"archive: {name} is encrypted; upload an unencrypted zip")
    if info.compress_type not in ZIP_METHODS:
        raise AdapterFormatError(f"archive: {name} uses compression method {info.compress_type}; use deflate or none")
    if info.file_size > max_bytes:
        raise AdapterFormatError(f"archive: {name} is larger than {max_bytes} bytes")
    try:
        with archive.open(info) as member:
            # read(n) inflates at most n bytes, and zipfile cuts a member off at its declared size:
            # one that inflates past what it declares fails its CRC check having cost no more.
            return member.read(info.file_size)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:  # ValueError: a bad header offset
        raise AdapterFormatError(f"archive: {name} is corrupt ({exc})") from None


def _read_zip(data: bytes, max_bytes: int) -> tuple[bytes, bytes]:
    _check_zip_directory(data)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    # ValueError: a name flagged UTF-8 that is not; NotImplementedError: a zip version from the future
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as exc:
        raise AdapterFormatError(f"archive: not a valid zip file ({exc})") from None
    # Members may sit in a folder (names ending in "/" are folders; a name may be empty); match by
    # base name and never extract to disk.
    members = {Path(i.filename).name: i for i in archive.infolist() if not i.filename.endswith("/")}
    found = {}
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        info = members.get(name)
        if info is None:
            raise AdapterFormatError(f"archive: missing {name}")
        found[name] = _read_member(archive, info, max_bytes)
    return found[CONFIG_NAME], found[WEIGHTS_NAME]


def split_upload(
    config: bytes | None, weights: bytes | None, archive: bytes | None, max_bytes: int
) -> tuple[bytes, bytes]:
    """Return (config bytes, weights bytes) from either the two files or one zip."""
    if archive is not None:
        if config is not None or weights is not None:
            raise AdapterFormatError("upload either `config` and `weights`, or `archive`, not both")
        return _read_zip(archive, max_bytes)
    if config is None or weights is None:
        missing = "config" if config is None else "weights"
        raise AdapterFormatError(f"{missing}: file is required (or upload a zip as `archive`)")
    return config, weights


MAX_CONFIG_INT_DIGITS = 100  # config integers are token counts and sizes


def _config_int(text: str) -> int:
    # Converting a long digit string costs quadratic time (Python refuses past 4,300 digits).
    digits = len(text.lstrip("-"))
    if digits > MAX_CONFIG_INT_DIGITS:
        raise ValueError(f"an integer has {digits} digits; at most {MAX_CONFIG_INT_DIGITS} allowed")
    return int(text)


def parse_adapter(
    config_bytes: bytes, weights_bytes: bytes, hidden_size: int, kv_shape: KVShape, max_virtual_tokens: int,
    base_fingerprint: str, task_id: int | None = None,
) -> ParsedAdapter:
    """Validate an uploaded adapter against the resident base model (`kv_shape`: its keys and
    values, which a PREFIX_TUNING adapter must match). `task_id`: which task's prompt a
    MULTITASK_PROMPT_TUNING adapter serves (default 0)."""
    try:
        config = json.loads(config_bytes.decode("utf-8"), parse_int=_config_int)
    except RecursionError:
        raise AdapterFormatError(f"{CONFIG_NAME}: JSON nested too deeply") from None
    except ValueError as exc:  # not UTF-8, not JSON, or an over-long integer
        raise AdapterFormatError(f"{CONFIG_NAME}: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_NAME}: must be a JSON object")
    kind = config.get("peft_type")
    if kind not in PEFT_TYPES:
        raise AdapterFormatError(f"{CONFIG_NAME}: peft_type must be one of {', '.join(PEFT_TYPES)}, got {kind!r}")
    if task_id is not None and kind != MULTITASK:
        raise AdapterFormatError(f"task_id applies to {MULTITASK} adapters only, this one is {kind}")
    n_tokens = config.get("num_virtual_tokens")
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or not 1 <= n_tokens <= max_virtual_tokens:
        raise AdapterFormatError(f"{CONFIG_NAME}: num_virtual_tokens must be an integer in 1..{max_virtual_tokens}")
    width = hidden_size
    if kind == PREFIX_TUNING:
        _check_prefix_config(config, kv_shape)
        width = prefix_kv.flat_width(kv_shape)
    else:
        token_dim = config.get("token_dim", hidden_size)
        if token_dim != hidden_size:
            raise AdapterFormatError(f"{CONFIG_NAME}: token_dim {token_dim} does not match the base model's {hidden_size}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterFormatError(f"{CONFIG_NAME}: num_transformer_submodules must be 1 for a decoder-only model")

    try:
        tensors = load_safetensors(weights_bytes)
        metadata = _safetensors_metadata(weights_bytes)
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{WEIGHTS_NAME}: not a valid safetensors file ({exc})") from None
    expected = {TENSOR_NAME, *TASK_TENSORS} if kind == MULTITASK else {TENSOR_NAME}
    if set(tensors) != expected:
        raise AdapterFormatError(f"{WEIGHTS_NAME}: a {kind} adapter holds exactly the tensors {sorted(expected)},"
                                 f" found {sorted(tensors)}")
    for name, tensor in tensors.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise AdapterFormatError(f"{WEIGHTS_NAME}: {name} must be float16, bfloat16 or float32, not {tensor.dtype}")
    prompt = tensors[TENSOR_NAME].float()
    if tuple(prompt.shape) != (n_tokens, width):
        raise AdapterFormatError(
            f"{WEIGHTS_NAME}: {TENSOR_NAME} has shape {list(prompt.shape)}, expected [{n_tokens}, {width}]"
        )
    if kind == MULTITASK:
        prompt = prompt * _task_factor(tensors, config, task_id or 0, n_tokens, hidden_size)
    if not torch.isfinite(prompt).all():
        raise AdapterFormatError(f"{WEIGHTS_NAME}: {TENSOR_NAME} contains NaN or infinite values")

    recorded = metadata.get(FINGERPRINT_KEY)
    if recorded is not None and recorded != base_fingerprint:
        raise BaseModelMismatch(f"adapter was made for base model {recorded}, this server runs {base_fingerprint}")
    return ParsedAdapter(
        prompt_embeddings=prompt,
        base_fingerprint=base_fingerprint,
        base_model_name=str(config.get("base_model_name_or_path") or ""),
        original_files=None if kind == PROMPT_TUNING else {CONFIG_NAME: config_bytes, WEIGHTS_NAME: weights_bytes},
    )


def _prefix_sizes(shape: KVShape) -> dict[str, int]:
    """How PEFT sizes a prefix for a model: its layers, key/value heads and their width."""
    return {"num_layers": shape.layers, "num_attention_heads": shape.kv_heads,
            "token_dim": shape.kv_heads * shape.head_dim}


def _check_prefix_config(config: dict, shape: KVShape) -> None:
    """A prefix's sizes must be this base model's."""
    for name, value in _prefix_sizes(shape).items():
        if config.get(name) != value:
            raise AdapterFormatError(f"{CONFIG_NAME}: {name} is {config.get(name)!r}; this base model's prefix needs "
                                     f"{value} (layers {shape.layers}, key/value heads {shape.kv_heads}, head size "
                                     f"{shape.head_dim})")


def _task_factor(tensors: dict, config: dict, task_id: int, n_tokens: int, hidden_size: int) -> torch.Tensor:
    """[n_tokens, hidden] that scales the shared prompt into task `task_id`'s (PEFT's MPT)."""
    tasks, ranks = config.get("num_tasks"), config.get("num_ranks")
    cols, rows = (tensors[name].float() for name in TASK_TENSORS)
    if not isinstance(tasks, int) or not isinstance(ranks, int) or isinstance(tasks, bool) or isinstance(ranks, bool):
        raise AdapterFormatError(f"{CONFIG_NAME}: num_tasks and num_ranks must be integers")
    if tuple(cols.shape) != (tasks, n_tokens, ranks) or tuple(rows.shape) != (tasks, ranks, hidden_size):
        raise AdapterFormatError(
            f"{WEIGHTS_NAME}: prefix_task_cols {list(cols.shape)} and prefix_task_rows {list(rows.shape)} must be"
            f" [{tasks}, {n_tokens}, {ranks}] and [{tasks}, {ranks}, {hidden_size}]")
    if not 0 <= task_id < tasks:
        raise AdapterFormatError(f"task_id must be in 0..{tasks - 1} for this adapter ({tasks} tasks), got {task_id}")
    return cols[task_id] @ rows[task_id]


def _safetensors_metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}


def peft_config(num_virtual_tokens: int, hidden_size: int, base_model_name: str) -> dict:
    """A PEFT PromptTuningConfig as PEFT itself writes it, so PeftModel.from_pretrained loads it."""
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": hidden_size,
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",
        "base_model_name_or_path": base_model_name,
        "inference_mode": True,
    }


def encode_adapter(prompt_embeddings: torch.Tensor, base_fingerprint: str, base_model_name: str) -> dict[str, bytes]:
    """The adapter's two files, by name, as PEFT writes them (float32 weights)."""
    prompt = prompt_embeddings.detach().to("cpu", torch.float32).contiguous()
    weights = save_safetensors({TENSOR_NAME: prompt}, metadata={"format": "pt", FINGERPRINT_KEY: base_fingerprint})
    config = json.dumps(peft_config(prompt.shape[0], prompt.shape[1], base_model_name), indent=2).encode()
    return {CONFIG_NAME: config, WEIGHTS_NAME: weights}


def content_sha256(prompt_embeddings: torch.Tensor) -> str:
    """The hash of the float32 prompt embeddings and their shape, not of the files: safetensors
    writes metadata keys in no fixed order, so equal adapters may differ byte for byte."""
    prompt = prompt_embeddings.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(json.dumps(list(prompt.shape)).encode())
    digest.update(prompt.numpy().tobytes())
    return digest.hexdigest()


def prefix_peft_config(num_virtual_tokens: int, shape: KVShape, base_model_name: str,
                       encoder_hidden_size: int | None = None) -> dict:
    """A PEFT PrefixTuningConfig as PEFT writes it for this base model (`encoder_hidden_size`: the
    width of the reparameterization MLP it was trained with, if any)."""
    return {
        "peft_type": PREFIX_TUNING,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": num_virtual_tokens,
        **_prefix_sizes(shape),
        "num_transformer_submodules": 1,
        "prefix_projection": encoder_hidden_size is not None,
        "encoder_hidden_size": encoder_hidden_size,
        "base_model_name_or_path": base_model_name,
        "inference_mode": True,
    }


def encode_prefix_adapter(flat: torch.Tensor, shape: KVShape, base_fingerprint: str, base_model_name: str,
                          encoder_hidden_size: int | None = None) -> dict[str, bytes]:
    """A PREFIX_TUNING adapter's two files as PEFT writes them: `flat` is
    [num_virtual_tokens, layers * 2 * kv_heads * head_dim] (app.engine.prefix_kv.to_flat)."""
    prefix = flat.detach().to("cpu", torch.float32).contiguous()
    weights = save_safetensors({TENSOR_NAME: prefix}, metadata={"format": "pt", FINGERPRINT_KEY: base_fingerprint})
    config = prefix_peft_config(prefix.shape[0], shape, base_model_name, encoder_hidden_size)
    return {CONFIG_NAME: json.dumps(config, indent=2).encode(), WEIGHTS_NAME: weights}


def is_prefix_tuning(files: dict[str, bytes]) -> bool:
    return SOFT_PROMPT_NAME not in files and json.loads(files[CONFIG_NAME]).get("peft_type") == PREFIX_TUNING


def stored_files(prompt_embeddings: torch.Tensor, base_fingerprint: str, base_model_name: str,
                 original_files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """What an adapter stores: its PEFT files, with the prompt served beside them when those are
    another kind's own (P_TUNING, MULTITASK_PROMPT_TUNING). A PREFIX_TUNING adapter's own files
    hold what is served."""
    if original_files is not None and is_prefix_tuning(original_files):
        return original_files
    files = encode_adapter(prompt_embeddings, base_fingerprint, base_model_name)
    return files if original_files is None else original_files | {SOFT_PROMPT_NAME: files[WEIGHTS_NAME]}


def read_served(files: dict[str, bytes]) -> tuple[torch.Tensor, bool]:
    """What a stored adapter serves (safetensors only, never pickle), and whether it is prefix
    tuning's keys and values rather than a soft prompt."""
    return load_safetensors(files.get(SOFT_PROMPT_NAME) or files[WEIGHTS_NAME])[TENSOR_NAME], is_prefix_tuning(files)


def zip_adapter(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            archive.writestr(name, files[name])
    return buffer.getvalue()
