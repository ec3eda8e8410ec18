"""Adapters: PEFT-format files that PEFT loads with the same outputs; merge equals base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import surogate
from surogate.training.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, find_peft_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_config():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                       tie_word_embeddings=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random tiny Qwen3 saved in bf16, as a user's local base model would be."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(), dtype=torch.bfloat16)
    d = tmp_path_factory.mktemp("base")
    model.save_pretrained(d)
    return d


def _base(base_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()


def _peft(base_dir):
    """A PEFT model whose LoRA B is not zero, so that the adapter changes the outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(_base(base_dir), cfg).eval()


def _ids():
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(5))


def test_save_adapter_writes_vllm_key_names(base_dir, tmp_path):
    model = _peft(base_dir)
    out = surogate.save_adapter(model, tmp_path / "a", base_model_name_or_path=str(base_dir))
    keys = set(load_file(out / ADAPTER_WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * len(TARGETS)  # A and B, per target, per layer
    assert not any(".default." in k or "_orig_mod" in k for k in keys)
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["base_model_name_or_path"] == str(base_dir)
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)


def test_peft_loads_saved_adapter_with_identical_outputs(base_dir, tmp_path):
    from peft import PeftModel

    model = _peft(base_dir)
    surogate.save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        want = model(input_ids=_ids()).logits
        reloaded = PeftModel.from_pretrained(_base(base_dir), tmp_path / "a").eval()
        got = reloaded(input_ids=_ids()).logits
        plain = _base(base_dir)(input_ids=_ids()).logits
    assert torch.equal(got, want)
    assert not torch.allclose(plain, want)  # the adapter does something


def test_save_adapter_equals_peft_save_pretrained(base_dir, tmp_path):
    model = _peft(base_dir)
    surogate.save_adapter(model, tmp_path / "ours")
    model.save_pretrained(tmp_path / "peft")
    ours, theirs = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS), load_file(tmp_path / "peft" / ADAPTER_WEIGHTS)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_save_adapter_through_a_wrapper(base_dir, tmp_path):
    """A wrapper that keeps the PEFT model reachable (torch.compile's OptimizedModule) still saves."""
    model = _peft(base_dir)
    wrapped = torch.compile(model, backend="eager")
    assert find_peft_model(wrapped) is model
    out = surogate.save_adapter(wrapped, tmp_path / "w")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in load_file(out / ADAPTER_WEIGHTS)


def test_save_adapter_refuses_a_model_without_lora(base_dir, tmp_path):
    with pytest.raises(TypeError, match="holds no LoRA adapter"):
        surogate.save_adapter(_base(base_dir), tmp_path / "x")


def test_load_adapter_from_paths(base_dir, tmp_path):
    model = _peft(base_dir)
    surogate.save_adapter(model, tmp_path / "a")
    loaded = surogate.load_adapter(str(base_dir), tmp_path / "a", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        surogate.load_adapter(str(base_dir), tmp_path)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_merge_equals_base_plus_adapter(base_dir, tmp_path, dtype, tol):
    model = _peft(base_dir)
    surogate.save_adapter(model, tmp_path / "a")
    (tmp_path / "m").mkdir()
    out = surogate.merge(base_dir, tmp_path / "a", tmp_path / "m", dtype=dtype)
    merged = _base(out)  # a plain HF checkpoint: no PEFT needed to load it
    assert not any("lora" in k for k in merged.state_dict())
    saved = load_file(next(out.glob("*.safetensors")))
    assert {v.dtype for k, v in saved.items() if k.endswith("proj.weight")} == {dtype}
    with torch.no_grad():
        want = model(input_ids=_ids()).logits
        got = merged(input_ids=_ids()).logits
    # bf16: the merged weight is rounded once to bf16 (relative 2^-9), so allow that much.
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_merge_takes_the_dtype_names_of_the_cli(base_dir, tmp_path, monkeypatch):
    """`dtype="float16"`, as `surogate merge --dtype` spells it, writes float16; a dtype a merged model is
    not written in is refused before anything loads."""
    from surogate.training import adapters

    model = _peft(base_dir)
    surogate.save_adapter(model, tmp_path / "a")
    out = surogate.merge(base_dir, tmp_path / "a", tmp_path / "m", dtype="float16")
    saved = load_file(next(out.glob("*.safetensors")))
    assert {v.dtype for k, v in saved.items() if k.endswith("proj.weight")} == {torch.float16}

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the dtype was checked")

    monkeypatch.setattr(adapters, "load_adapter", no_load)
    for bad in ("fp16", "half", torch.int8, 16):
        with pytest.raises(ValueError, match=r"^dtype: .* is not one a merged model is written in; give one of "
                                             r"bfloat16, float16, float32"):
            surogate.merge(base_dir, tmp_path / "a", tmp_path / "x", dtype=bad)
    assert not (tmp_path / "x").exists()


def test_adapter_of_a_compiled_model_loads_onto_the_plain_base(base_dir, tmp_path):
    """What surogate.compile returns saves an adapter that plain PEFT on the bf16 base reproduces."""
    from peft import LoraConfig, PeftModel

    torch.manual_seed(1)
    model = surogate.compile(_base(base_dir, torch.bfloat16), recipe="bf16", arch="cpu",
                             lora=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    model.eval()
    out = surogate.save_adapter(model, tmp_path / "c")
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight" in load_file(out / ADAPTER_WEIGHTS)
    with torch.no_grad():
        compiled = model(input_ids=_ids()).logits.float()
        reloaded = PeftModel.from_pretrained(_base(base_dir, torch.bfloat16), out).eval()
        eager = reloaded(input_ids=_ids()).logits.float()
        plain = _base(base_dir, torch.bfloat16)(input_ids=_ids()).logits.float()
    # Same weights; the compiled graph computes the LoRA branch in bf16, PEFT eager in FP32.
    err = (compiled - eager).abs().max()
    assert err < 0.1 * (plain - eager).abs().max(), err
