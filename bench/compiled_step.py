"""Whether torch.compile of the decoder layer stack makes a decode step faster, on the default model.

Two copies of the int8 model as this CPU loads it: one eager (what the engine runs), one whose
decoder stack (every layer, norms, rotary, activations and residuals) is compiled by torch.compile
(inductor; inductor keeps its cache on disk) with static shapes: one graph per step size, compiled
on its first step, so no step pays for dynamic shapes: the most compiling can save (a server would
need its step sizes padded to a few buckets). Only the parts
inductor cannot trace stay opaque, as custom ops: the integer products (`torch._int_mm`, oneDNN's or
fbgemm's, as chosen at load) and the paged attention (a Python loop over row groups). Quantizing
the inputs, rescaling the sums, and slicing q/k/v and gate/up out of their one shared product are
compiled with the rest, so nothing but the dispatch of small ops is left to save. The two copies
decode the same rows greedily, interleaved, for each batch size; steps are timed whole (medians).
Reported: the compiled step against the eager one, the seconds the first steps spent compiling,
whether each copy decoded every prompt to the same tokens in every batch (property 6), and whether
both gave the same tokens (inductor fuses the small ops and rounds in its own order, so
greedy tokens part at near-ties: adopting it would mean compiling the reference decode too). The
target (issue 24, item 6): a one-row step at 0.8x eager's or less. The last stdout line is one JSON
object.

    python -m bench.compiled_step [--rows 1 4 32] [--steps 16] [--repeats 3]
"""

import argparse
import json
import statistics
import time
import types

import torch
from bitsandbytes.nn import Linear8bitLt
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from app.engine import attention, int8
from app.engine.loader import BaseModel
from bench.step_profile import PROMPTS, Sections, decode_steps, load

TARGET = 0.8
_PRODUCTS: list[tuple] = []  # (what the integer product reads, its oneDNN packing or None), by index
_ATTENTION: dict[int, torch.nn.Module] = {}  # layer index -> attention module


@torch.library.custom_op("softserve_bench::integer_sums", mutates_args=())
def integer_sums(quantized: torch.Tensor, index: int) -> torch.Tensor:
    """int8 rows [M, K] times product `index`'s int8 weight: the exact sums, as float32 [M, N]."""
    weight, packed = _PRODUCTS[index]
    return int8._int_mm(quantized, weight, 3, packed).float()


@integer_sums.register_fake
def _(quantized, index):
    return quantized.new_empty(quantized.shape[0], _PRODUCTS[index][0].shape[0], dtype=torch.float32)


@torch.library.custom_op("softserve_bench::paged_attention", mutates_args=())
def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float,
                    window: int | None) -> torch.Tensor:
    step = attention._current.get()
    return attention._paged_attention(step, _ATTENTION[layer], query, key, value, scaling, window, None)[0]


@paged_attention.register_fake
def _(query, key, value, layer, scaling, window):
    return query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])


def _int8_product(x: torch.Tensor, index: int, columns: slice, scale: torch.Tensor) -> torch.Tensor:
    """int8._int8_matmul's arithmetic, in the same order, with only the integer sums opaque."""
    quantized, row_scale = int8._quantize_rows(x.reshape(-1, x.shape[-1]))
    out = integer_sums(quantized, index) * row_scale.unsqueeze(-1) * scale
    return out.view(*x.shape[:-1], -1)[..., columns].to(x.dtype)


def compile_stack(base: BaseModel) -> None:
    """Route base's int8 layers and attention through the custom ops above, then compile its decoder stack."""
    groups: dict[int, int] = {}
    for module in base.model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "q_proj"):
            _ATTENTION[module.layer_idx] = module
        if not isinstance(module, Linear8bitLt) or not hasattr(module, "dequantize_scale"):
            continue
        shared = module.shared_input
        if shared is None:
            index, columns, scale = len(_PRODUCTS), slice(None), module.dequantize_scale
            _PRODUCTS.append((module.product_weight, module.packed_weight))
        else:  # its group's one product, computed once in the compiled graph
            if id(shared) not in groups:
                groups[id(shared)] = len(_PRODUCTS)
                _PRODUCTS.append((shared.weight, shared.packed))
            index, columns, scale = groups[id(shared)], shared.columns[module], shared.scale
        module.forward = types.MethodType(
            lambda self, x, index=index, columns=columns, scale=scale: _int8_product(x, index, columns, scale), module)
    name = attention.PREFIX + "compiled"  # its own: the eager copy's registrations stay as they are
    AttentionInterface.register(name, lambda module, query, key, value, mask, **kwargs: (paged_attention(
        query, key, value, module.layer_idx, kwargs["scaling"], kwargs.get("sliding_window")), None))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, lambda *args, **kwargs: None)  # engine steps make no mask
    base.model.set_attn_implementation(name)
    torch._dynamo.config.cache_size_limit = 64  # static shapes: one graph per step size, well under this
    base.model.model.compile(dynamic=False)


def batch_invariant(tokens_by_batch: list[list[list[int]]]) -> bool:
    """Whether every prompt decoded to the same tokens in every batch it was part of (row i of a
    batch decodes PROMPTS[i % len(PROMPTS)]): docs/engine.md, property 6."""
    decoded: dict[int, set] = {}
    for batch in tokens_by_batch:
        for i, tokens in enumerate(batch):
            decoded.setdefault(i % len(PROMPTS), set()).add(tuple(tokens))
    return all(len(variants) == 1 for variants in decoded.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    models = {"eager": load(), "compiled": load()}
    compile_stack(models["compiled"])
    sections = Sections()  # unused sections: only whole steps are timed
    start = time.perf_counter()
    for rows in args.rows:  # the first steps of each batch size compile
        decode_steps(models["compiled"], rows, 2, sections)
    report: dict = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                    "kernels": models["eager"].int8_kernels, "compile_s": round(time.perf_counter() - start, 1),
                    "ms": {}, "compiled_vs_eager": {}, "same_tokens_as_eager": {}}
    decoded: dict[str, list] = {name: [] for name in models}  # every batch's tokens, for batch invariance
    for rows in args.rows:
        steps: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.repeats):  # interleaved
            for name, base in models.items():
                measured, tokens, _ = decode_steps(base, rows, args.steps, sections)
                steps[name] += [step["step"] for step in measured]
                decoded[name].append(tokens)
        median = {name: statistics.median(times) * 1e3 for name, times in steps.items()}
        report["ms"][rows] = {name: round(ms, 2) for name, ms in median.items()}
        report["compiled_vs_eager"][rows] = round(median["compiled"] / median["eager"], 3)
        report["same_tokens_as_eager"][rows] = decoded["compiled"][-1] == decoded["eager"][-1]
        print(f"rows={rows:2d}", json.dumps(report["ms"][rows]), "compiled/eager", report["compiled_vs_eager"][rows],
              "same tokens", report["same_tokens_as_eager"][rows], flush=True)
    report["batch_invariant"] = {name: batch_invariant(batches) for name, batches in decoded.items()}
    one_row = report["compiled_vs_eager"].get(1)
    report["target"] = f"one-row step compiled <= {TARGET}x eager"
    report["target_met"] = one_row is not None and one_row <= TARGET
    print(json.dumps(report))


if __name__ == "__main__":
    main()
