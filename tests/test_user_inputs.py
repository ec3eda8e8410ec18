"""What users hand `surogate.compile` and the model it returns: shared configs, padding on every loss path,
merging, LoRA options and labels it must refuse with a clear message (found by a new-user pass)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as T
from peft import LoraConfig, PeftModel
from test_compile_models import V, tiny_config

import surogate
from surogate.compiler import DEFAULT_TARGETS, AlreadyCompiledError, _attach_lora
from surogate.ops.modules import SurogateLinear

LORA = {"r": 8, "lora_alpha": 16, "init_lora_weights": False}  # B != 0: the adapter changes the outputs


def _model(name: str = "llama", config=None) -> torch.nn.Module:
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config or tiny_config(name)).to(torch.bfloat16)


def _pair(name: str, **compile_options):
    """(compiled, eager PEFT copy) with the same base weights and LoRA factors."""
    peft_model = _attach_lora(_model(name), LORA)
    eager = copy.deepcopy(peft_model)
    return surogate.compile(peft_model, recipe="bf16", arch="cpu", **compile_options), eager


def _left_padded(pads: int = 5, length: int = 11):
    """One row left-padded by `pads` and one full row, their mask, and labels without padding targets."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, V, (2, pads + length), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :pads], mask[0, :pads] = 0, 0
    labels = torch.where(mask == 1, ids, -100)
    labels[0, pads] = -100  # the first real token is not predicted from a pad
    return ids, mask, labels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _lora_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for n, p in sorted(model.named_parameters()) if "lora_" in n])


# --- one config object, several models ------------------------------------------------------------------

def test_models_sharing_one_config_each_compile_and_an_uncompiled_sibling_keeps_its_mask():
    """from_config(cfg) keeps a reference to cfg: compile must write on a copy (attention implementation,
    use_cache), or the second compile's attention calls itself and the sibling drops its padding mask."""
    cfg = tiny_config("llama")
    first, second, sibling = _model(config=cfg), _model(config=cfg), _model(config=cfg)
    assert first.config is cfg and sibling.config is cfg
    ids, mask, labels = _left_padded()
    with torch.no_grad():
        before = sibling(input_ids=ids, attention_mask=mask).logits
    for model in (first, second):
        compiled = surogate.compile(model, arch="cpu")
        loss = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        assert torch.isfinite(loss)
    assert cfg._attn_implementation == "sdpa" and cfg.use_cache is True  # the user's config, untouched
    with torch.no_grad():
        assert torch.equal(sibling(input_ids=ids, attention_mask=mask).logits, before)


# --- padding and packing on every loss path -------------------------------------------------------------

@pytest.mark.parametrize("name", ["opt", "gpt2", "llama"])
def test_left_padded_loss_and_grads_match_hf_eager(name):
    """OPT derives its learned positions from the mask (cumsum): the backbone must get the mask HF gets."""
    compiled, eager = _pair(name)
    ids, mask, labels = _left_padded()
    ref = eager(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    loss = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-3
    assert torch.nn.functional.cosine_similarity(_lora_grads(compiled), _lora_grads(eager), dim=0) > 0.999


@pytest.mark.parametrize("chunked_loss", [True, False])
def test_a_label_predicted_from_padding_is_not_scored(chunked_loss):
    """Left padding with labels masked on the padding only (a collator's `labels[mask == 0] = -100`): the first
    real token's prediction comes from a padding position, which HF's SDPA computes with no attention and its
    eager attention from the whole row, the predicted token included (checked below: a leak). surogate does not
    score it: the same loss and gradients as with that label masked, and those are HF's."""
    compiled, eager = _pair("llama", chunked_loss=chunked_loss)
    ids, mask, labels = _left_padded()
    scored = torch.where(mask == 1, ids, -100)  # the first real token's label kept
    assert not torch.equal(scored, labels)
    loss = compiled(input_ids=ids, attention_mask=mask, labels=scored).loss
    loss.backward()
    grads = _lora_grads(compiled)
    compiled.zero_grad()
    masked = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
    masked.backward()
    assert torch.equal(loss, masked) and torch.equal(grads, _lora_grads(compiled))
    assert torch.equal(scored, torch.where(mask == 1, ids, -100))  # the caller's labels untouched
    ref = eager(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-3
    assert torch.nn.functional.cosine_similarity(grads, _lora_grads(eager), dim=0) > 0.999

    leaky = copy.deepcopy(eager).float()
    leaky.config._attn_implementation = "eager"
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % V  # the token the padding position predicts
    with torch.no_grad():
        at_pad = [leaky(input_ids=x, attention_mask=mask).logits[0, 4] for x in (ids, changed)]
    assert (at_pad[0] - at_pad[1]).abs().max() > 1e-3  # HF eager's prediction there sees its own target


@pytest.mark.parametrize("name", ["gemma2", "llama"])
def test_generate_between_training_steps_compiles_nothing_and_decodes_as_peft(name):
    """`generate()` (a KV cache) runs the blocks eagerly: compiled, every cache state recompiled a block, and a
    Gemma-2 train / eval / generate loop reached Dynamo's recompile limit (8) in two rounds, a 15-line warning,
    after which a new training shape would have run eagerly."""
    from torch._dynamo.utils import counters

    compiled, eager = _pair(name)
    ids = torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(3))
    compiled(input_ids=ids, labels=ids).loss.backward()
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(3):
        with torch.no_grad():
            out = compiled.generate(input_ids=ids[:1, :4], max_new_tokens=6, do_sample=False)
            ref = eager.generate(input_ids=ids[:1, :4], max_new_tokens=6, do_sample=False)
        assert torch.equal(out, ref)
        compiled(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == graphs  # neither generate nor the steps after it compiled


def test_chunked_loss_off_keeps_padding_and_packed_rows():
    """chunked_loss=False runs HF's head and loss, but the attention still needs the segments of the mask and
    of packed position_ids, in training and in inference."""
    compiled, eager = _pair("llama", chunked_loss=False)
    ids, mask, labels = _left_padded()
    with torch.no_grad():
        loss = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
        ref = eager(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert abs(loss.item() - ref.item()) / ref.item() < 1e-3
        logits = compiled(input_ids=ids, attention_mask=mask).logits
        ref_logits = eager(input_ids=ids, attention_mask=mask).logits
        assert _rel(logits[mask == 1], ref_logits[mask == 1]) < 3e-2  # bf16 logits; the mask ignored: 1.0

        a, b = ids[1, :6], ids[1, 6:]  # two examples packed in one row, positions restarting at 0
        row, positions = torch.cat([a, b])[None], torch.cat([torch.arange(6), torch.arange(10)])[None]
        row_labels = row.clone()
        row_labels[0, 6] = -100  # no target across the boundary
        packed = compiled(input_ids=row, position_ids=positions, labels=row_labels).loss
        alone = (eager(input_ids=a[None], labels=a[None]).loss * 5
                 + eager(input_ids=b[None], labels=b[None]).loss * 9) / 14  # targets per example: 5 and 9
        assert abs(packed.item() - alone.item()) / alone.item() < 1e-3


# --- merging the compiled model -------------------------------------------------------------------------

@pytest.mark.parametrize("name, recipe, bound", [("gpt2", "bf16", 2e-2), ("llama", "qfp8", 0.1)])
def test_merge_and_unload_gives_the_plain_model_with_the_users_config(name, recipe, bound):
    """PEFT's merge on plain base layers (GPT-2's Conv1D transposed; q-recipes dequantized); the merged model
    has the user's use_cache and attention implementation back and can be compiled again."""
    model = _model(name)
    ids, mask, _ = _left_padded()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    compiled = surogate.compile(model, recipe=recipe, lora=LORA, arch="cpu")
    with torch.no_grad():
        adapted = compiled(input_ids=ids, attention_mask=mask).logits
    merged = compiled.merge_and_unload()
    assert not isinstance(merged, PeftModel) and not any(isinstance(m, SurogateLinear) for m in merged.modules())
    assert merged.config.use_cache is True and merged.config._attn_implementation == "sdpa"
    with torch.no_grad():
        logits = merged(input_ids=ids, attention_mask=mask).logits
    assert _rel(logits[mask == 1], adapted[mask == 1]) < bound < _rel(base[mask == 1], adapted[mask == 1])
    surogate.compile(merged, arch="cpu")


@pytest.mark.parametrize("recipe", ["fp8", "qnf4"])
def test_merge_adapter_into_quantized_base_weights_is_refused(recipe):
    """fp8 keeps a bf16 weight that its GEMMs never read: PEFT's merge_adapter() added B @ A there and the
    adapter silently left the outputs; qnf4 freed it and PEFT failed with an AttributeError from inside."""
    compiled = surogate.compile(_model(), recipe=recipe, lora=LORA, arch="cpu")
    ids, mask, labels = _left_padded()
    with torch.no_grad():
        before = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
        with pytest.raises(ValueError, match="merge_adapter\\(\\) cannot merge .* use merge_and_unload\\(\\)"):
            compiled.merge_adapter()
        assert torch.equal(compiled(input_ids=ids, attention_mask=mask, labels=labels).loss, before)


def test_merge_adapter_on_bf16_runs_peft_merge():
    """The bf16 recipe's GEMMs read the weight PEFT merges into in place (packed views included): its merge is
    kept; safe_merge=True (a new tensor, which the packed buffers never see) is refused."""
    compiled, eager = _pair("llama")
    ids, mask, labels = _left_padded()
    with torch.no_grad():
        with compiled.disable_adapter():
            base = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
        with pytest.raises(ValueError, match=r"merge_adapter\(safe_merge=True\) puts a new weight tensor"):
            compiled.merge_adapter(safe_merge=True)  # the packed q/k/v, gate/up would keep the unmerged weights
    for model in (compiled, eager):
        model.merge_adapter()
    with torch.no_grad():
        merged = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert _rel(merged, eager(input_ids=ids, attention_mask=mask, labels=labels).loss) < 1e-3
        assert _rel(merged, base) > 1e-3  # the adapter is in the outputs


def test_an_adapter_variant_added_after_compile_is_refused_by_name():
    """add_adapter after compile skipped compile's check: DoRA ran unfused (bf16) or failed inside PEFT on a
    q-recipe's freed weight (TypeError: Input weight should be of type nn.Parameter)."""
    compiled = surogate.compile(_model(), recipe="qnf4", lora=LORA, arch="cpu")
    with pytest.raises(ValueError, match="lora use_dora=True is not supported"):
        compiled.add_adapter("dora", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert "dora" not in compiled.peft_config
    compiled.add_adapter("plain", LoraConfig(r=4, target_modules=["q_proj"]))
    assert "plain" in compiled.peft_config


# --- LoRA options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, linears", [
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("opt", {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),  # not q/k/v alone
    ("gpt2", {"c_attn", "c_proj", "c_fc"}),  # none of the names: every linear in the blocks
])
def test_default_targets_cover_every_linear_of_the_blocks(name, linears):
    compiled = surogate.compile(_model(name), arch="cpu")
    lora = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in compiled.named_parameters() if ".lora_A" in n}
    assert lora == linears


def test_lora_config_without_targets_gets_the_default_targets():
    compiled = surogate.compile(_model(), lora=LoraConfig(r=8, lora_alpha=16), arch="cpu")
    assert set(compiled.peft_config["default"].target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_compiling_the_original_model_again_raises_already_compiled():
    model = _model()
    surogate.compile(model, arch="cpu")
    with pytest.raises(AlreadyCompiledError, match="already passed through surogate.compile"):
        surogate.compile(model, recipe="qfp8", arch="cpu")


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"lora_bias": True}, {"bias": "all"},
                                  LoraConfig(r=8, target_modules=["q_proj"], use_dora=True)])
def test_unsupported_lora_variants_are_refused_by_name(lora):
    field = next(iter(lora)) if isinstance(lora, dict) else "use_dora"
    model = _model()
    with pytest.raises(ValueError, match=f"lora {field}=.* not supported"):
        surogate.compile(model, lora=lora, arch="cpu")
    assert not isinstance(model, PeftModel) and not hasattr(model, "peft_config")


def test_lora_given_as_a_string_is_refused():
    with pytest.raises(TypeError, match="lora takes a dict of LoraConfig options .* or a peft.LoraConfig"):
        surogate.compile(_model(), lora="r=8", arch="cpu")


def test_excluded_and_absent_default_targets_do_not_warn():
    """exclude_modules removes an existing target (not one that matches nothing); the default list, passed as
    a list (as `surogate train` does), means those of its names the model has."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*match no layer")
        compiled = surogate.compile(_model(), lora={"exclude_modules": ["k_proj"]}, arch="cpu")
        surogate.compile(_model(), lora={"target_modules": list(DEFAULT_TARGETS)}, arch="cpu")
    lora_layers = [n for n, m in compiled.named_modules() if hasattr(m, "lora_A")]
    assert lora_layers and not any(n.endswith("k_proj") for n in lora_layers)


# --- labels ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunked_loss", [True, False])
def test_labels_hf_rejects_are_refused(chunked_loss):
    """HF's loss raises for these; surogate read -1 as token 0 (or ignored it) and took int32 as is."""
    compiled = surogate.compile(_model(), arch="cpu", chunked_loss=chunked_loss)
    ids = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(3))
    for value in (-1, -101, V):
        labels = ids.clone()
        labels[0, 4] = value
        with pytest.raises(ValueError, match=f"labels hold {value}"):
            compiled(input_ids=ids, labels=labels)
    with pytest.raises(ValueError, match="labels must be int64"):
        compiled(input_ids=ids, labels=ids.to(torch.int32))
    # All labels -100 give loss 0, not HF's NaN (a micro-batch of prompt tokens only): tests/test_loss.py.

