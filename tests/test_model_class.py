"""A checkpoint published as a vision-language model (Qwen3.5) trains as its own class
(surogate/training/model_class.py): the adapter's names are the checkpoint's, so PEFT loads it onto the published
model, `surogate merge` writes the whole model back, and text rows train as through the text model."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from safetensors.torch import load_file
from tiny_models import tiny_raw_config, write_config

import surogate
from surogate.compiler import _attach_lora
from surogate.training.cli import main
from surogate.training.model_class import causal_lm_class
from surogate.training.tokenizer import DEFAULT_VOCAB_SIZE

VLM = getattr(T, "Qwen3_5ForConditionalGeneration", None)
pytestmark = pytest.mark.skipif(VLM is None, reason=f"transformers {T.__version__} has no Qwen3.5")

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "full_attention_interval": 2,
        "vocab_size": DEFAULT_VOCAB_SIZE, "max_position_embeddings": 256, "tie_word_embeddings": True}
VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}
MOE_TEXT = {**{k: v for k, v in TEXT.items() if k != "intermediate_size"}, "num_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}


def _vlm(moe: bool = False, seed: int = 0) -> torch.nn.Module:
    """A tiny Qwen3.5 (or Qwen3.5-MoE, routers sharpened as in the MoE tests) vision-language model."""
    from test_more_archs import sharpen_routers

    torch.manual_seed(seed)
    if not moe:
        return VLM(T.Qwen3_5Config(text_config=TEXT, vision_config=VISION, tie_word_embeddings=True)).to(torch.bfloat16)
    config = T.Qwen3_5MoeConfig(text_config=MOE_TEXT, vision_config=VISION, tie_word_embeddings=True)
    model = T.Qwen3_5MoeForConditionalGeneration(config).to(torch.bfloat16)
    sharpen_routers(model)
    return model


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_5-vlm")
    _vlm().save_pretrained(path)
    return path


def test_the_class_is_the_checkpoints_for_qwen3_5_only(vlm_dir, tmp_path):
    assert causal_lm_class(T.AutoConfig.from_pretrained(vlm_dir)) is VLM
    _vlm(moe=True).save_pretrained(tmp_path / "moe")
    assert causal_lm_class(T.AutoConfig.from_pretrained(tmp_path / "moe")) is T.Qwen3_5MoeForConditionalGeneration
    assert causal_lm_class(T.Qwen3_5TextConfig(**TEXT)) is T.AutoModelForCausalLM  # a text checkpoint
    assert causal_lm_class(T.Qwen3Config()) is T.AutoModelForCausalLM
    llama4 = T.Llama4Config()
    llama4.architectures = ["Llama4ForConditionalGeneration"]  # its VLM class fails text rows (module doc)
    assert causal_lm_class(llama4) is T.AutoModelForCausalLM


@pytest.mark.parametrize("moe", [False, True])
def test_the_vlm_class_follows_fp32_peft_and_keeps_packed_examples_apart(moe):
    """Text rows through the VLM class compiled: loss and LoRA gradients against FP32 PEFT on the same class;
    a packed row's loss equals its examples' alone."""
    peft_model = _attach_lora(_vlm(moe), {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    truth = copy.deepcopy(peft_model).float()
    model = surogate.compile(peft_model, recipe="bf16", arch="cpu")
    assert not any("visual" in n for n, _ in model.named_parameters() if "lora_" in n)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, DEFAULT_VOCAB_SIZE, (2, 48), generator=gen)
    expected = truth(input_ids=ids, labels=ids).loss
    expected.backward()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - expected.item()) < 2e-3 * expected.item()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    ref = {n: p.grad for n, p in truth.named_parameters() if "lora_" in n}
    assert grads.keys() == ref.keys() and any(".language_model.layers." in n for n in grads)
    assert not moe or any(".experts." in n for n in grads)
    for n in grads:
        assert F.cosine_similarity(grads[n].float().flatten(), ref[n].float().flatten(), dim=0).item() > 0.98, n
    examples = [torch.randint(3, DEFAULT_VOCAB_SIZE, (1, n), generator=gen) for n in (20, 28)]
    row, positions = torch.cat(examples, 1), torch.cat([torch.arange(20), torch.arange(28)])[None]
    labels = row.clone()
    labels[0, 20] = -100  # the second example's first token is not predicted from the first's last
    with torch.no_grad():
        alone = sum(truth(input_ids=e, labels=e).loss.item() * (e.shape[1] - 1) for e in examples) / 46
        packed = model(input_ids=row, labels=labels, position_ids=positions).loss.item()
    assert abs(packed - alone) < 3e-3 * alone, (packed, alone)


def test_trained_adapter_loads_onto_the_published_class_and_merges_whole(vlm_dir, tmp_path, monkeypatch):
    """`surogate train` on the VLM checkpoint: the adapter names model.language_model.layers.N, PEFT loads it onto
    Qwen3_5ForConditionalGeneration with no missing key and its LoRA B trained; the merge keeps the vision tower."""
    from peft import PeftModel

    monkeypatch.setenv("SUROGATE_CACHE_DIR", str(tmp_path / "cache"))
    raw = tiny_raw_config(vlm_dir, tmp_path / "out", lora_target_modules=["q_proj", "v_proj", "out_proj"])
    assert main(["train", write_config(tmp_path / "run.yaml", raw)]) == 0
    adapter = tmp_path / "out" / "adapter"
    keys = list(load_file(adapter / "adapter_model.safetensors"))
    assert keys and all(".language_model.layers." in k for k in keys), keys[:2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(VLM.from_pretrained(vlm_dir, dtype=torch.bfloat16), str(adapter))
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    lora_b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    merged = surogate.merge(vlm_dir, adapter, tmp_path / "merged")
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    whole = VLM.from_pretrained(merged, dtype=torch.bfloat16)
    assert any(n.startswith("model.visual.") for n, _ in whole.named_parameters())
