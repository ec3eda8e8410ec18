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
from surogate.ops.modules import SurogateLinear
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


def _shape(model: nn.Module) -> tuple:
    """What compile would change: module types, parameter names and flags, config and instance attributes."""
    modules = [(n, type(m).__name__, sorted(k for k in vars(m) if not k.startswith("_")))
               for n, m in model.named_modules()]
    return (modules,
            [(n, p.requires_grad, p.dtype) for n, p in model.named_parameters()],
            model.config.use_cache, model.config._attn_implementation, hasattr(model, "peft_config"))


def _train_one_step(model: nn.Module) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.isfinite(loss) and lora_b.grad.abs().sum() > 0
    opt.step()
    assert lora_b.abs().sum() > 0  # B left its zero init: the model trains


def test_float32_model_is_refused_untouched_then_compiles_in_bf16():
    """All or nothing: the dtype check runs before LoRA is attached, so the fix the message gives works."""
    model = _qwen3(torch.float32)
    before = _shape(model)
    with pytest.raises(TypeError, match=r"takes bfloat16 base weights.*model\.to\(torch\.bfloat16\)"):
        surogate.compile(model, recipe="qfp8", arch="cpu")
    assert _shape(model) == before and not isinstance(model, PeftModel)
    model.to(torch.bfloat16)
    _train_one_step(surogate.compile(model, recipe="qfp8", arch="cpu"))


def test_a_model_quantized_by_its_loader_is_refused_with_how_to_dequantize(tmp_path):
    """A QLoRA script loads the model with bitsandbytes' `quantization_config` (its linears Linear4bit, weights
    uint8): the dtype message said "load the model with dtype=torch.bfloat16", which the user had done. It names
    the quantized layer and `model.dequantize(dtype=...)`, the model left as it came; dequantized, it compiles."""
    bnb = pytest.importorskip("bitsandbytes")  # in the test extras; the FP8 case below runs without it
    _qwen3().save_pretrained(tmp_path)
    config = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.bfloat16)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    before = _shape(model)
    with pytest.raises(TypeError, match=r"q_proj is a bitsandbytes Linear4bit \(weights stored as torch\.uint8: "
                                        r"the model was loaded with a quantization_config\).*"
                                        r"model\.dequantize\(dtype=torch\.bfloat16\).*"
                                        r"recipe='qnf4' \(bitsandbytes' NF4"):
        surogate.compile(model, recipe="qnf4", arch="cpu")
    assert _shape(model) == before and not isinstance(model, PeftModel)
    _train_one_step(surogate.compile(model.dequantize(dtype=torch.bfloat16), recipe="qnf4", arch="cpu"))


def test_fp8_stored_weights_are_refused_as_quantized_not_as_a_dtype():
    """transformers' FP8 checkpoints (FP8Linear: float8_e4m3fn weights) are quantized by the loader, as above."""
    model = _qwen3()
    proj = model.model.layers[0].self_attn.q_proj
    proj.weight = nn.Parameter(proj.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(TypeError, match=r"q_proj is a torch Linear \(weights stored as torch\.float8_e4m3fn"):
        surogate.compile(model, recipe="fp8", arch="cpu")


def test_failure_after_the_checks_hands_the_model_back(monkeypatch):
    """A step past the checks that fails (here the third base-layer swap) undoes LoRA, swaps and flags."""
    model = _qwen3()
    before = _shape(model)
    real, calls = SurogateLinear.from_linear, []

    def third_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a format refused this shape")
        return real(*args, **kwargs)

    monkeypatch.setattr(SurogateLinear, "from_linear", third_fails)
    with pytest.raises(RuntimeError, match="refused this shape"):
        surogate.compile(model, recipe="qfp8", arch="cpu")
    assert _shape(model) == before and len(calls) == 3
    monkeypatch.setattr(SurogateLinear, "from_linear", real)
    _train_one_step(surogate.compile(model, recipe="qfp8", arch="cpu"))


def test_targets_matching_nothing_are_refused_before_peft():
    model = _qwen3()
    before = _shape(model)
    with pytest.raises(ValueError, match=r"match no layer of Qwen3ForCausalLM; its linear layers: down_proj, "
                                         r"gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        surogate.compile(model, arch="cpu", lora={"target_modules": ["q_porj"]})
    assert _shape(model) == before
    with pytest.warns(UserWarning, match=r"\['q_porj'\] match no layer"):  # some match: LoRA on those, said once
        compiled = surogate.compile(model, arch="cpu", lora={"target_modules": ["q_proj", "q_porj"]})
    assert len(compiled.surogate_report.pending) > 0


def test_mlp_names_peft_sends_to_the_experts_are_not_called_unmatched():
    """A dense target list on an MoE model: PEFT's conversion takes gate/up/down_proj off target_modules and trains
    the expert stacks through target_parameters. That is said in the report, with no warning that they match no
    layer (the warning used to say so, and that LoRA went on the others only); a real typo is still warned about,
    at the caller's line, under the model's class name."""
    import warnings

    cfg = T.Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128, num_experts=4,
                           num_experts_per_tok=2)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=8, target_modules=targets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = surogate.compile(T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16), arch="cpu", lora=lora)
    assert not [w for w in caught if "match no layer" in str(w.message)]
    assert lora.target_modules == set(targets) and not lora.target_parameters  # the user's config as it was
    assert any("['down_proj', 'gate_proj', 'up_proj'] are the experts' here" in n
               for n in model.surogate_report.notes), model.surogate_report.notes
    assert any(".experts." in n for n, _ in model.named_parameters() if "lora_A" in n)
    with pytest.warns(UserWarning, match=r"\['qq_proj'\] match no layer of Qwen3MoeForCausalLM") as record:
        surogate.compile(T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16), arch="cpu",
                         lora=LoraConfig(r=8, target_modules=["q_proj", "qq_proj"]))
    assert any(w.filename == __file__ for w in record if "qq_proj" in str(w.message))


def test_report_is_complete_on_return_or_says_why_not():
    model = surogate.compile(_qwen3(), recipe="qfp8", arch="cpu")
    text = str(model.surogate_report)
    assert "linears: pending until the first forward (Dynamo compiles lazily); 14 LoRA target layers" in text
    assert "0 rewritten of 0" not in text
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    text = str(model.surogate_report)
    assert "pending" not in text and "linears (7 rewritten of 7):" in text


def test_no_deprecation_notice_from_our_own_calls():
    """transformers 5 deprecates `past_key_values` on outputs (a logger notice) and PEFT's read of
    `is_gradient_checkpointing` (a FutureWarning): compile, forward and backward trigger neither."""
    import logging
    import warnings

    notices: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = notices.append
    hf_logger = logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()  # transformers says each notice once per process: say it again
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = surogate.compile(_qwen3(), arch="cpu")
            ids = torch.randint(0, 128, (2, 8))
            model(input_ids=ids, labels=ids).loss.backward()
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        hf_logger.removeHandler(handler)
    noisy = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
             and "torch.jit" not in str(w.message)]
    assert noisy == []
    assert [r.getMessage() for r in notices if "deprecated" in r.getMessage()] == []


@pytest.mark.parametrize("recipe, frozen_bytes_per_weight", [("bf16", 2.0), ("qfp8", 1.0), ("qnf4", 0.5)])
def test_parameter_counts(recipe, frozen_bytes_per_weight):
    """trainable = the LoRA factors; frozen = the base's elements, also when quantized; bytes as stored."""
    from surogate.ops.modules import parameter_counts

    reference = _qwen3()
    base = sum(p.numel() for p in reference.parameters())
    linear = sum(m.weight.numel() for n, m in reference.named_modules()
                 if isinstance(m, nn.Linear) and n.startswith("model.layers"))
    model = surogate.compile(_qwen3(), recipe=recipe, arch="cpu", lora={"r": 4, "lora_alpha": 8})
    counts = parameter_counts(model, recipe)
    lora = 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))  # q, k+v, o, gate+up, down
    assert counts.trainable == lora and counts.frozen == base
    rest = 2 * (base - linear)  # embeddings, norms: bf16
    assert counts.frozen_bytes - rest >= frozen_bytes_per_weight * linear
    assert counts.frozen_bytes - rest < (frozen_bytes_per_weight + 0.3) * linear  # scales and tables on top
    assert str(counts).startswith(f"trainable {lora / 1e3:.1f}k params (LoRA), frozen {base / 1e3:.1f}k params "
                                  "stored in ") and str(counts).endswith(f"({recipe})")


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


def test_compile_tags_the_torch_compile_cache_with_surogates_sources():
    """Inductor's FX-graph cache does not hash a custom op's fake or kernels: the key carries surogate's
    source hash, beside a tag the user set."""
    import torch

    from surogate.cache import source_tag
    from surogate.compat import tag_compile_cache

    # config.patch, not monkeypatch: pytest 9.2's undo deletes an attribute a config module serves through
    # __getattr__, which breaks torch.compiler.config for every later test of the process.
    with torch.compiler.config.patch(cache_key_tag="mine"):
        assert tag_compile_cache(source_tag())
        assert torch.compiler.config.cache_key_tag == f"mine+{source_tag()}"
        tag_compile_cache(source_tag())  # idempotent
        assert torch.compiler.config.cache_key_tag == f"mine+{source_tag()}"
    assert source_tag().startswith("surogate-") and len(source_tag()) == len("surogate-") + 12


def test_backend_puts_its_options_in_the_compile_cache_key(monkeypatch):
    """AOTAutograd's cache strips node.meta, where the passes steer the partition (recompute_producers):
    two backends that differ only in an option must compile under different cache keys, or one is served
    the other's partition (bench/NOTES.md run 51), and "auto" compiles under the key of what it decided; the user's tag is back after each compile. Each compile hands
    Inductor the post-grad pass that builds the fused GEMMs' gradient cats in place (passes/concat.py)."""
    import torch._inductor.compile_fx as inductor_compile_fx

    from surogate.compiler import make_backend
    from surogate.passes import CompileReport
    from surogate.recipes import get

    seen, patches = [], []
    monkeypatch.setattr(inductor_compile_fx, "compile_fx", lambda gm, inputs, config_patches=None: (
        seen.append(torch.compiler.config.cache_key_tag), patches.append(config_patches)) and gm)
    with torch.compiler.config.patch(cache_key_tag="mine"):  # not monkeypatch: see the test above
        for recompute in (False, True, False, "auto"):
            backend = make_backend(get("bf16"), "sm_90", CompileReport(recipe="bf16", arch="sm_90", backend="x"),
                                   {"horizontal": True, "producer": True, "recompute_producers": recompute})
            backend(torch.fx.symbolic_trace(lambda x: x * 2), [torch.ones(2)])
            assert torch.compiler.config.cache_key_tag == "mine"
    assert seen[0] == seen[2] != seen[1] and all(t.startswith("mine+surogate-options-") for t in seen)
    assert seen[3] == seen[1]  # "auto" is keyed as what it decided (here: nothing to weigh, so rebuilt)
    assert all(type(p["post_grad_custom_post_pass"]).__name__ == "SurogatePostGrad" for p in patches)


def test_the_trainer_dequantizes_a_checkpoint_stored_quantized(tmp_path, capsys):
    """`surogate train` on a "-bnb-4bit" checkpoint: transformers loads it quantized whatever `dtype` says, and
    compile then refused it (above), with advice a config cannot follow. The trainer dequantizes it on load, says
    so, and hands the recipe bf16 weights equal to the dequantized NF4 ones."""
    pytest.importorskip("bitsandbytes")
    from surogate.training.config import from_dict
    from surogate.training.setup import load_base_model

    _qwen3().save_pretrained(tmp_path / "bf16")
    config = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    quantized = T.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=config,
                                                       dtype=torch.bfloat16)
    quantized.save_pretrained(tmp_path / "nf4")
    expected = quantized.dequantize(dtype=torch.bfloat16).model.layers[0].mlp.up_proj.weight
    model = load_base_model(from_dict({"model": str(tmp_path / "nf4")}), [0] * 100)
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is nn.Linear and up.weight.dtype == torch.bfloat16 and torch.equal(up.weight, expected)
    assert "is stored quantized (bitsandbytes): dequantized to bf16 on load" in capsys.readouterr().out
