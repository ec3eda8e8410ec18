"""surogate.compile's contract: errors and warnings, no recompile per length, report, adapter saving."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import surogate
from surogate.compiler import AlreadyCompiledError
from surogate.modules import SurogateLinear
from surogate.recipes import RecipeNotSupportedError


def _qwen3(dtype=torch.bfloat16):
    torch.manual_seed(0)
    cfg = T.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=128)
    return T.AutoModelForCausalLM.from_config(cfg).to(dtype)


def test_unknown_recipe():
    with pytest.raises(ValueError, match="valid recipes"):
        surogate.compile(_qwen3(), recipe="int3", arch="cpu")


def test_recipe_not_native_needs_allow_emulation():
    with pytest.raises(RecipeNotSupportedError, match="allow_emulation=True"):
        surogate.compile(_qwen3(), recipe="qfp4", arch="sm_90")


def test_emulated_recipe_warns_then_checks_the_device():
    with pytest.warns(UserWarning, match="not native"), pytest.raises(ValueError, match="CUDA"):
        surogate.compile(_qwen3(), recipe="qfp4", arch="sm_90", allow_emulation=True)


def test_model_without_linears():
    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = T.PretrainedConfig()
            self.layers = nn.ModuleList([nn.LayerNorm(8) for _ in range(2)])

    with pytest.raises(ValueError, match="no linear"):
        surogate.compile(NoLinear(), arch="cpu")


def test_trainable_base_weights_are_refused():
    model = get_peft_model(_qwen3(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable"):
        surogate.compile(model, arch="cpu")


def test_already_compiled():
    model = surogate.compile(_qwen3(), arch="cpu")
    with pytest.raises(AlreadyCompiledError):
        surogate.compile(model, arch="cpu")
    with pytest.raises(AlreadyCompiledError, match="_orig_mod"):
        surogate.compile(torch.compile(_qwen3()), arch="cpu")


def test_float32_model_is_refused():
    with pytest.raises(TypeError, match="bfloat16"):
        surogate.compile(_qwen3(torch.float32), recipe="qfp8", arch="cpu")


def test_q_recipe_frees_bf16_weight_and_default_targets():
    model = surogate.compile(_qwen3(), recipe="qnf4", arch="cpu")
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert isinstance(layer.base_layer, SurogateLinear) and layer.base_layer.weight is None
    targets = set(model.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert model.peft_config["default"].r == 16 and model.peft_config["default"].lora_alpha == 32


def test_no_recompile_per_sequence_length_and_report(tmp_path):
    torch._dynamo.utils.counters.clear()
    model = surogate.compile(_qwen3(), recipe="qfp8", arch="cpu")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for length in (8, 13, 21, 32):
        ids = torch.randint(0, 128, (2, length))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    report = model.surogate_report
    assert report.graphs == 1 and len(report.rewritten) == 7
    text = str(report)
    for name in ("self_attn.q_proj", "mlp.down_proj", "rmsnorm", "surogate::lm_head_ce"):
        assert name in text

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    reloaded = PeftModel.from_pretrained(_qwen3(), tmp_path)
    a = reloaded.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(a.float(), b.float())


def test_lora_dict_and_no_labels_returns_logits():
    model = surogate.compile(_qwen3(), arch="cpu", lora={"r": 4, "lora_alpha": 4, "target_modules": ["o_proj"]})
    ids = torch.randint(0, 128, (1, 6))
    out = model(input_ids=ids)
    assert out.logits.shape == (1, 6, 128)
    assert len(model.surogate_report.linears) == 1
    assert model.surogate_report.graphs == 1  # HF's path too: no KV cache, so no recompile per layer


def test_whole_model_capture_without_regions():
    model = surogate.compile(_qwen3(), recipe="qfp8", arch="cpu", regional=False)
    ids = torch.randint(0, 128, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and len(model.surogate_report.rewritten) == 14  # 7 per layer, both layers
