"""Beyond Gemma: the same checks on tiny random models of every family people prompt-tune.

For each: the engine's greedy output for a mixed batch of 8 adapters equals the no-cache
reference; the training loss is the masked cross-entropy of the model's own full forward (its own
head and final-logit processing), and one training step lowers it; PEFT interop both ways gives
PEFT's first-step logits, for prompt tuning and prefix tuning (per-layer keys and values) alike.
The families differ where soft prompts are fragile: absolute positions
(GPT-2, OPT's offset learned ones) or rotary, tied or untied heads, no pad token, logit softcapping.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from app.datasets import Example
from app.engine.generation import generate_batch
from app.engine.loader import BaseModel, load_base_model
from app.engine.reference import reference_greedy_decode
from app.engine.requests import GenerationRequest
from app.train_config import TrainConfig
from tests.conftest import build_tiny_model, random_soft_prompt, upload_adapter
from tests.test_peft_interop import (
    FP32,
    PROMPTS,
    assert_serves_peft_logits,
    download,
    upload_peft_folder,
)
from tests.worker.test_training import batch_loss
from worker.training import VirtualTokens, encode_example, init_prompt, train_adapter

SPECIAL = {"vocab_size": 512, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
LAYERS = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 1024}
ROTARY = LAYERS | {"intermediate_size": 128, "num_key_value_heads": 2}

# name -> (config, whether the tokenizer declares a pad token)
FAMILIES = {
    "llama": (lambda: LlamaConfig(**SPECIAL, **ROTARY, tie_word_embeddings=False), True),
    "qwen2": (lambda: Qwen2Config(**SPECIAL, **ROTARY, tie_word_embeddings=True), True),
    "qwen3": (lambda: Qwen3Config(**SPECIAL, **ROTARY, head_dim=16, tie_word_embeddings=True), True),
    "mistral": (lambda: MistralConfig(**SPECIAL, **ROTARY, sliding_window=None, tie_word_embeddings=False), True),
    # OPT: learned absolute positions offset by 2, the 6.7B-class model this product is about.
    "opt": (lambda: OPTConfig(**SPECIAL, **LAYERS, ffn_dim=128, word_embed_proj_dim=64), True),
    # GPT-2: learned absolute positions, tied head, and no pad token.
    "gpt2": (lambda: GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=1024, eos_token_id=1,
                                bos_token_id=2), False),
    "gpt_neox": (lambda: GPTNeoXConfig(**SPECIAL, **LAYERS, intermediate_size=128, tie_word_embeddings=False), True),
    "phi3": (lambda: Phi3Config(**SPECIAL, **ROTARY, tie_word_embeddings=False), True),
    "gemma2": (lambda: Gemma2Config(**SPECIAL, **ROTARY | {"num_key_value_heads": 1}, head_dim=32, sliding_window=8,
                                    final_logit_softcapping=3.0, tie_word_embeddings=False), True),
    "gemma3": (lambda: Gemma3TextConfig(**SPECIAL, **ROTARY | {"num_key_value_heads": 1}, head_dim=32,
                                        sliding_window=512, layer_types=["sliding_attention", "full_attention"],
                                        tie_word_embeddings=False), True),
}

TEMPLATE = "Review: {input}\nSentiment:"
EXAMPLES = [Example(text, label) for text, label in [
    ("a gripping , funny film", "positive"), ("a dull , lifeless mess", "negative"),
    ("the cast is great", "positive"), ("it drags on and on , really long", "negative"),
]]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[Path, BaseModel]:
    make_config, pad_token = FAMILIES[request.param]
    folder = build_tiny_model(tmp_path_factory.mktemp(request.param), make_config(), pad_token=pad_token)
    return folder, load_base_model(folder, Path("unused"), quantization="fp32", device="cpu")


def test_mixed_batch_of_eight_adapters_matches_the_reference(family):
    _, base = family
    prompts = [base.tokenizer(text).input_ids for text in ("a gripping , funny film", "Hello", PROMPTS[0], "ok")]
    requests = [GenerationRequest(prompts[i % 4], random_soft_prompt(base, 3 + i, seed=i), max_new_tokens=8)
                for i in range(8)]
    results = generate_batch(base, requests)
    for request, result in zip(requests, results):
        assert result.token_ids == reference_greedy_decode(base, request.soft_prompt, request.prompt_ids, 8)
    assert len({tuple(r.token_ids) for r in results}) > 1  # the adapters really steer the rows apart


def masked_cross_entropy(base: BaseModel, prompt: torch.Tensor, pairs) -> torch.Tensor:
    """The model's own full forward over each row alone, cross-entropy on the target tokens only."""
    embed = base.model.get_input_embeddings()
    losses, count = [], 0
    for prompt_ids, target in pairs:
        ids = torch.tensor(prompt_ids + target)
        logits = base.model(inputs_embeds=torch.cat([prompt, embed(ids)])[None], use_cache=False).logits[0]
        labels = torch.full((len(prompt) + len(ids),), -100)
        labels[len(prompt) + len(prompt_ids):] = torch.tensor(target)
        losses.append(F.cross_entropy(logits[:-1].float(), labels[1:], reduction="sum"))
        count += len(target)
    return sum(losses) / count


def test_training_loss_is_the_masked_cross_entropy_and_a_step_lowers_it(family):
    _, base = family
    config = TrainConfig(num_virtual_tokens=4, max_steps=1, eval_every=1, batch_size=len(EXAMPLES),
                         learning_rate=0.01, template=TEMPLATE)
    pairs = [encode_example(base, e, TEMPLATE, 64) for e in EXAMPLES]
    assert pairs[0][1][-1] == base.tokenizer.eos_token_id  # models without a pad token end targets too
    start = init_prompt(base, config, EXAMPLES)
    with torch.no_grad():
        before = batch_loss(base, VirtualTokens("prompt_tuning", start), pairs)
        torch.testing.assert_close(before, masked_cross_entropy(base, start, pairs), **FP32)
    trained = train_adapter(base, config, EXAMPLES, validation=EXAMPLES).learned
    with torch.no_grad():
        assert batch_loss(base, trained, pairs) < before


def test_peft_interop_both_ways(family, make_client, tmp_path):
    folder, base = family
    client = make_client(base)
    ours = upload_adapter(client, random_soft_prompt(base, 6, seed=5))["id"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder),
                                           download(client, ours, tmp_path / "ours"))
    assert_serves_peft_logits(client, ours, peft_model, **FP32)

    torch.manual_seed(1)  # PEFT draws its initial prompt from the global generator
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    theirs.save_pretrained(tmp_path / "theirs")
    response = upload_peft_folder(client, tmp_path / "theirs", "from-peft")
    assert response.status_code == 201, response.text
    assert_serves_peft_logits(client, response.json()["id"], theirs.eval(), **FP32)


def test_prefix_tuning_from_peft_serves_its_logits_and_mixes_with_soft_prompts(family, make_client, tmp_path):
    folder, base = family
    client = make_client(base)
    torch.manual_seed(2)
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    theirs.save_pretrained(tmp_path / "prefix")
    response = upload_peft_folder(client, tmp_path / "prefix", "prefix")
    assert response.status_code == 201, response.text
    adapter_id = response.json()["id"]
    assert_serves_peft_logits(client, adapter_id, theirs.eval(), **FP32)

    prefix, _ = client.portal.call(client.app.state.runtime.adapter_resolver.soft_prompt, adapter_id)
    prompts = [base.tokenizer(text).input_ids for text in ("a gripping , funny film", "Hello", PROMPTS[0], "ok")]
    requests = [GenerationRequest(prompts[i], prefix if i % 2 else random_soft_prompt(base, 3 + i, seed=i), 8)
                for i in range(4)]
    for request, result in zip(requests, generate_batch(base, requests)):
        assert result.token_ids == reference_greedy_decode(base, request.soft_prompt, request.prompt_ids, 8)
