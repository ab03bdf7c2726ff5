"""Where a decode step's time goes, and how int8 kernels compare, on the default model.

For each batch size, rows decode greedily together (one engine, no adapters, SST-2-like prompts);
every decode step after the first token is timed whole and in sections, each exclusive of the
sections inside it: the layers' int8 products, the int8 LM head, attention, sampling, and the rest
(norms, rotary, activations, embedding, the engine's bookkeeping: per-op overhead). Medians over
steps. With `--compare-float-copies`, a second copy of the model is loaded with the int8 values held
as float32 (the path CPUs without a fast torch._int_mm took before fbgemm's), and the two are
timed interleaved. On AVX2, where the engine multiplies with its own int8 kernel, `--compare-fbgemm`
loads another copy through fbgemm as a node without a C compiler does (int8 values packed as
float16), and `--compare-int8-only` one through fbgemm without packed weights
(INT8_PACKED_WEIGHTS=false: int8 in fbgemm's int8 layout, rows split by sign). With
`--compare-transformers-norms`, another copy keeps transformers' own RMS norms (not
app.engine.fused_norms'), timed interleaved too. With `--compare-head-kernel`, another copy
takes the other kernel for the LM head's one-row products than this CPU picks at load (oneDNN's packed
product or torch._int_mm; neither the AVX2 int8 kernel). Where the head reads its few-row products
with the AVX2 int8 kernel (measured faster at load), `--compare-head-without-avx2-kernel` loads
another copy whose head never does. On a CPU with AMX, where products of more than one row go
through the engine's AMX int8 kernel, `--compare-without-amx-kernel` loads another copy as a node
without a C compiler does (torch._int_mm and oneDNN's packed weights, oneDNN below AMX).
`--compare-without-float-kernel` loads one whose RMS norms, GELU and decode attention go through
torch's ops, not the engine's float kernel (app/engine/float_avx2.c), and `--compare-torch-norms`
one whose RMS norms alone do (`F.rms_norm`); `--compare-torch-rotary` runs the first model
again with transformers' own rotary embedding (app.engine.fused_rotary switches it per modeling
module). Every model runs with glibc's allocator set as a serving node with MAX_BATCH_SIZE at the
largest `--rows` sets it (its logits kept on the heap: app.engine.loader.keep_freed_memory);
`--compare-default-allocator` runs the first model again with the allocator as a model load leaves
it (buffers past 40 MB mapped afresh). Each model's first step (every row's prefill and first
token) is timed too: "prefill" in the JSON. To see an AVX2 CPU's figures on a newer one:
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2. The
last stdout line is one JSON object.

    python -m bench.step_profile [--rows 1 8 32] [--steps 16] [--repeats 3] [--compare-float-copies]
                                [--compare-fbgemm] [--compare-int8-only] [--compare-transformers-norms]
                                [--compare-head-kernel] [--compare-head-without-avx2-kernel]
                                [--compare-without-amx-kernel] [--compare-without-float-kernel]
                                [--compare-torch-norms] [--compare-torch-rotary] [--compare-default-allocator]
"""

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager, nullcontext
from unittest.mock import patch

import torch

from app.config import Settings
from app.engine import attention, core, float_kernel, fused_rotary, int8, loader
from app.engine.generation import _engine_for
from app.engine.loader import BaseModel, load_base_model
from app.engine.requests import GenerationRequest

PROMPTS = ["Review: a gripping , funny and moving film\nSentiment:", "Once upon a time", "The capital of France is",
           "Review: the plot is a mess and the acting is worse\nSentiment:"]
HEAD = "LM head"


class Sections:
    """Exclusive wall time per named section, for the step in progress."""

    def __init__(self):
        self.times: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []

    @contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            _, inner = self._stack.pop()
            spent = time.perf_counter() - start
            self.times[name] += spent - inner
            if self._stack:
                self._stack[-1][1] += spent

    def wrap(self, owner, attribute: str, name: str) -> None:
        """Time calls of owner.attribute as `name`, except within the LM head (its own product)."""
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            if self._stack and self._stack[-1][0] == HEAD:
                return original(*args, **kwargs)
            with self.section(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)


def load(float_copies: bool = False, fused_norms: bool = True, packed: bool = True,
         other_head_kernel: bool = False, fbgemm: bool = False, head_without_kernel: bool = False,
         amx_kernel: bool = True, with_float_kernel: bool = True, kernel_norms: bool = True) -> BaseModel:
    """The default int8 model as this CPU loads it, or with its int8 values as float32 copies, or
    with transformers' own RMS norms, or without packed weights, or with the other one-row head
    kernel, or (on AVX2) through fbgemm instead of the AVX2 int8 kernel, or with the LM head's
    few-row products never by the AVX2 int8 kernel, or (on AMX) without the AMX int8 kernel, or
    without the float kernel (torch's norms, GELU and gathered attention), or with torch's
    `F.rms_norm` for the norms the float kernel would compute."""
    with ExitStack() as changes:
        if not with_float_kernel:  # what is fused is decided at load
            changes.enter_context(patch.object(float_kernel, "_library", lambda: None))
        if not amx_kernel:
            changes.enter_context(patch.object(int8, "amx_products_win", lambda: False))
        if head_without_kernel or other_head_kernel:
            changes.enter_context(patch.object(int8, "kernel_rows_for", lambda weight, product: 0))
        if fbgemm or float_copies:
            changes.enter_context(patch.object(int8, "plain_kernel_is_exact", lambda: False))
        if other_head_kernel:
            chosen = int8.packed_reads_one_row_faster
            changes.enter_context(patch.object(int8, "packed_reads_one_row_faster",
                                               lambda weight, packed: not chosen(weight, packed)))
        if float_copies:
            changes.enter_context(patch.object(int8, "half_packed_is_exact", lambda: False))
            changes.enter_context(patch.object(int8, "split_sign_is_exact", lambda: False))
        if not fused_norms:
            changes.enter_context(patch.object(loader, "fuse_rms_norms", lambda model, dtype: (0, 0)))
        if not kernel_norms:
            changes.enter_context(patch("app.engine.fused_norms._kernel_gives", lambda *args: False))
        return load_base_model(None, Settings().model_cache_dir, quantization="int8", device="cpu",
                               int8_packed_weights=packed)


@torch.inference_mode()
def decode_steps(base: BaseModel, rows: int, steps: int, sections: Sections) -> tuple[list[dict[str, float]], list, float]:
    """Times of the first step (prefill and the first token) and of each decode step after it,
    and every row's tokens (prompt and generated)."""
    requests = [GenerationRequest(prompt_ids=base.tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids,
                                  soft_prompt=None, max_new_tokens=steps + 1) for i in range(rows)]
    engine = _engine_for(base, requests)
    handles = [engine.add(request) for request in requests]
    start = time.perf_counter()
    engine.step()  # prefill and the first token
    prefill, measured = time.perf_counter() - start, []
    for _ in range(steps):
        if any(handle.finished_at is not None for handle in handles):
            break  # a row stopped: later steps would have fewer rows
        sections.times.clear()
        start = time.perf_counter()
        engine.step()
        measured.append({**sections.times, "step": time.perf_counter() - start})
    return measured, [handle.tokens for handle in handles], prefill


def step_context(name: str, base: BaseModel):
    """What a comparison changes while its steps run: decode attention picks its kernel per step,
    and rotary embedding is its modeling module's function."""
    if name == "without_float_kernel":
        return patch.object(float_kernel, "_library", lambda: None)
    if name == "torch_rotary":
        modeling = sys.modules[type(base.model).__module__]
        switched = getattr(modeling, fused_rotary.NAME)
        return patch.object(modeling, fused_rotary.NAME, getattr(switched, "original", switched))
    return nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-float-copies", action="store_true")
    parser.add_argument("--compare-fbgemm", action="store_true")
    parser.add_argument("--compare-int8-only", action="store_true")
    parser.add_argument("--compare-transformers-norms", action="store_true")
    parser.add_argument("--compare-head-kernel", action="store_true")
    parser.add_argument("--compare-head-without-avx2-kernel", action="store_true")
    parser.add_argument("--compare-without-amx-kernel", action="store_true")
    parser.add_argument("--compare-without-float-kernel", action="store_true")
    parser.add_argument("--compare-torch-norms", action="store_true")
    parser.add_argument("--compare-torch-rotary", action="store_true")
    parser.add_argument("--compare-default-allocator", action="store_true")
    args = parser.parse_args()
    sections = Sections()
    sections.wrap(int8, "_int8_matmul", "int8 products (layers)")
    sections.wrap(int8.Int8Head, "forward", HEAD)
    sections.wrap(attention, "_paged_attention", "attention")
    sections.wrap(core, "sample", "sampling")
    models = {"chosen": load()}  # the kernels this CPU picks at load
    if args.compare_float_copies:
        models["float_copies"] = load(float_copies=True)
    if args.compare_fbgemm:
        models["fbgemm"] = load(fbgemm=True)
    if args.compare_int8_only:
        models["int8_only"] = load(packed=False, fbgemm=True)
    if args.compare_transformers_norms:
        models["transformers_norms"] = load(fused_norms=False)
    if args.compare_head_kernel:
        models["other_head_kernel"] = load(other_head_kernel=True)
    if args.compare_head_without_avx2_kernel:
        models["head_without_kernel"] = load(head_without_kernel=True)
    if args.compare_without_amx_kernel:
        models["without_amx_kernel"] = load(amx_kernel=False)
    if args.compare_without_float_kernel:
        models["without_float_kernel"] = load(with_float_kernel=False)
    if args.compare_torch_norms:
        models["torch_norms"] = load(kernel_norms=False)
    if args.compare_torch_rotary:
        models["torch_rotary"] = models["chosen"]  # the same model, its modeling module's original function
    if args.compare_default_allocator:
        models["default_allocator"] = models["chosen"]  # the same model, only glibc's settings differ
    logits_bytes = models["chosen"].logits_bytes(max(args.rows))  # as app.runtime.planned_core sizes the allocator
    report: dict = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                    "kernels": {name: base.int8_kernels for name, base in models.items()}, "ms": {}}
    for rows in args.rows:
        samples: dict[str, list[dict[str, float]]] = defaultdict(list)
        prefills: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.repeats):  # interleaved
            for name, base in models.items():
                loader.keep_freed_memory(0 if name == "default_allocator" else logits_bytes)
                with step_context(name, base):
                    measured, _, prefill = decode_steps(base, rows, args.steps, sections)
                samples[name] += measured
                prefills[name].append(prefill)
        for name, steps in samples.items():
            keys = sorted({key for step in steps for key in step})
            median = {key: round(statistics.median(step.get(key, 0.0) for step in steps) * 1e3, 2) for key in keys}
            median["other (per-op overhead)"] = round(median["step"] - sum(
                v for k, v in median.items() if k != "step"), 2)
            median["prefill"] = round(statistics.median(prefills[name]) * 1e3, 2)
            report["ms"][f"{name} rows={rows}"] = median
            print(f"{name:12s} rows={rows:2d} steps={len(steps)}", json.dumps(median), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
