"""surogate.weight_packing: the frozen weights of q/k/v and gate/up stored once, concatenated, read whole by the
fused GEMM (issue 19). The graph side (no concatenation, nothing held for the backward) is in
test_passes_fusion.py."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import transformers as T

import surogate
from surogate import weight_packing
from surogate.ops import prepare_weight
from surogate.ops.modules import SurogateLinear, parameter_counts
from surogate.training import distributed

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _qwen3(n_kv_dim: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = T.Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=n_kv_dim, vocab_size=128)
    return T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)


def _block(model, i: int = 0):
    return model.base_model.model.model.layers[i]


def _layer(block, name: str) -> torch.nn.Module:
    return getattr(block.self_attn if name in GROUPS[0] else block.mlp, name)


def _base(block, name: str) -> SurogateLinear:
    return _layer(block, name).base_layer


def _step(model, seed: int = 1):
    torch.manual_seed(seed)
    ids = torch.randint(0, 128, (2, 24))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recipe", ["bf16", "qfp8", "qnf4"])
def test_compile_packs_each_group_once_and_stores_nothing_twice(recipe):
    model = _qwen3()
    originals = {name: _layer(model.model.layers[0], name).weight.detach().clone() for group in GROUPS for name in group}
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    model = surogate.compile(model, recipe=recipe, arch="cpu")
    block = _block(model)
    for group in GROUPS:
        bases = [_base(block, name) for name in group]
        assert len({b.w0.data_ptr() for b in bases}) == 1  # one buffer, registered in every member
        rows = 0
        for name, base in zip(group, bases):
            # Each member reads exactly the parts it held before packing (NF4: its own mean as the offset of
            # each of its 256-code groups, the one absmax code table shared).
            for got, want in zip(base.weight_list(), prepare_weight(originals[name], base.weight_format)):
                assert torch.equal(got.view(torch.uint8) if got.dtype.itemsize == 1 else got,
                                   want.view(torch.uint8) if want.dtype.itemsize == 1 else want)
            start, stop = base._rows[0]
            assert start == rows and stop - start == base.weight_list()[0].shape[0]
            assert base.weight_list()[0].data_ptr() == base.w0.data_ptr() + start * base.w0.stride(0) * base.w0.element_size()
            rows = stop
        assert rows == bases[0].w0.shape[0]
        if recipe == "qnf4":
            assert all(b.w4 is bases[0].w4 and b._rows[4] == (0, 256) for b in bases)
            offsets = bases[0].w3  # one mean per member, repeated over its groups
            assert len(torch.unique(offsets)) == len(bases) and offsets.numel() == bases[0].w2.numel()
        if recipe == "bf16":  # the kept bf16 weight is a view of the packed rows, not a second copy
            assert all(b.weight.data_ptr() == b.weight_list()[0].data_ptr() for b in bases)
    if recipe == "bf16":
        assert parameter_counts(model).frozen_bytes == stored  # bf16 stores exactly what the model held
    assert not any(k.endswith(("w0", "w1")) for k in model.state_dict())  # buffers, not checkpointed


@pytest.mark.parametrize("recipe", ["bf16", "qfp8"])
def test_packed_step_equals_the_step_over_weights_concatenated_in_the_graph(recipe):
    packed = surogate.compile(_qwen3(), recipe=recipe, arch="cpu")
    concatenated = surogate.compile(_qwen3(), recipe=recipe, arch="cpu")
    assert weight_packing.unpack(concatenated) == 10  # q, k, v, gate, up in 2 layers
    loss_p, grads_p = _step(packed)
    loss_c, grads_c = _step(concatenated)
    assert "over the packed weights" in str(packed.surogate_report)
    assert "over concatenated weights" in str(concatenated.surogate_report)
    assert torch.equal(loss_p, loss_c)
    assert grads_p.keys() == grads_c.keys() and len(grads_p) == 28  # A and B of 7 targets x 2 layers
    for name in grads_p:
        assert torch.equal(grads_p[name], grads_c[name]), name


def test_nf4_groups_run_one_gemm_and_follow_the_unfused_model():
    """NF4 q/k/v and gate/up: one GEMM over the packed lists (each member's absmax scales and mean read by its
    own 256-code groups), the loss and LoRA gradients those of the same model with horizontal fusion off."""
    fused = surogate.compile(_qwen3(), recipe="qnf4", arch="cpu")
    apart = surogate.compile(_qwen3(), recipe="qnf4", arch="cpu", horizontal=False)
    for model in (fused, apart):  # nonzero B, so that A has a gradient and B's term reaches the output
        torch.manual_seed(3)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    # The packed list, read whole as the fused GEMM reads it, decodes to the members' weights stacked, bit for bit.
    from surogate.kernels.reference import dequantize_weight_ref

    block = _block(fused)
    for group in GROUPS:
        bases = [_base(block, name) for name in group]
        whole = [getattr(bases[0], f"w{i}") for i in range(5)]
        n = sum(b.out_features for b in bases)
        stacked = torch.cat([dequantize_weight_ref(b.weight_list(), "nf4", (b.out_features, 256)) for b in bases])
        assert torch.equal(dequantize_weight_ref(whole, "nf4", (n, 256)), stacked)
        assert torch.equal(stacked.bfloat16(), torch.cat([b.dequantize() for b in bases]))  # through the op
    loss_f, grads_f = _step(fused)
    loss_a, grads_a = _step(apart)
    report = str(fused.surogate_report)
    assert report.count("one GEMM over the packed weights [nf4]") == 2, report  # q/k/v, gate/up (one block graph)
    assert "over the packed weights" not in str(apart.surogate_report)
    assert torch.allclose(loss_f, loss_a, rtol=1e-3)
    assert grads_f.keys() == grads_a.keys() and len(grads_f) == 28
    for name in grads_f:
        assert ((grads_f[name] - grads_a[name]).norm() / grads_a[name].norm()).item() < 2e-2, name
    # Undone packing (a model changed after compile): NF4 is not concatenated in the graph, not fused.
    weight_packing.unpack(fused)
    torch._dynamo.reset()
    _step(fused)
    assert "nf4 weights not packed at compile" in str(fused.surogate_report)


def test_packing_follows_what_horizontal_fusion_can_fuse():
    # qfp8 with k/v of 64 rows: FP8 128-blocks do not concatenate, so only gate/up is packed.
    model = surogate.compile(_qwen3(n_kv_dim=32), recipe="qfp8", arch="cpu")
    block = _block(model)
    assert _base(block, "q_proj")._rows is None and _base(block, "k_proj")._rows is None
    assert _base(block, "gate_proj")._rows is not None
    # NF4 with k/v of 32 x 256 weights (8,192 values, half an absmax scale group): only gate/up is packed.
    model = surogate.compile(_qwen3(n_kv_dim=16), recipe="qnf4", arch="cpu")
    block = _block(model)
    assert _base(block, "q_proj")._rows is None and _base(block, "k_proj")._rows is None
    assert _base(block, "gate_proj")._rows is not None
    # Dropout on the branch: the members would share one mask, so they are neither fused nor packed.
    model = surogate.compile(_qwen3(), recipe="bf16", arch="cpu", lora={"r": 8, "lora_dropout": 0.1})
    assert not any(isinstance(b, SurogateLinear) and b._rows is not None for b in model.modules())
    # horizontal=False: nothing to read whole, nothing packed.
    model = surogate.compile(_qwen3(), recipe="qfp8", arch="cpu", horizontal=False)
    assert all(b._rows is None for b in model.modules() if isinstance(b, SurogateLinear))


def test_the_targets_present_are_packed_and_fused():
    """LoRA on q and v only (a common choice): k is not a target, so q and v form the group."""
    model = surogate.compile(_qwen3(), recipe="bf16", arch="cpu", lora={"r": 8, "target_modules": ["q_proj", "v_proj"]})
    _step(model)
    block = _block(model)
    q, v = block.self_attn.q_proj.base_layer, block.self_attn.v_proj.base_layer
    assert q._rows == ((0, 256),) and v._rows == ((256, 384),) and q.w0 is v.w0
    assert "one GEMM over the packed weights [bf16]: self_attn.q_proj, self_attn.v_proj" in str(model.surogate_report)


def test_a_failed_compile_gives_back_the_original_linears():
    model = _qwen3()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with mock.patch.object(surogate.compiler.moe, "swap_experts", side_effect=RuntimeError("boom")):
        with pytest.raises(RuntimeError, match="boom"):
            surogate.compile(model, recipe="bf16", arch="cpu")
    assert not any(isinstance(m, SurogateLinear) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_unpack_and_fsdp_preparation_give_each_member_its_own_rows():
    model = surogate.compile(_qwen3(), recipe="qfp8", arch="cpu")
    q, k = _base(_block(model), "q_proj"), _base(_block(model), "k_proj")
    want = [t.clone() for t in k.weight_list()]
    # FSDP2 shards each module's parameters on its own: the parts become per-member parameters again.
    distributed._quantized_parts_as_parameters(model)
    assert k._rows is None and q._rows is None
    assert k.w0.data_ptr() != q.w0.data_ptr() and k.w0.shape[0] == k.out_features
    assert all(torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
                           b.view(torch.uint8) if b.dtype.itemsize == 1 else b) for a, b in zip(k.weight_list(), want))


def test_bf16_packing_frees_the_original_copies_during_compile():
    """The nn.Linear kept to undo a failed compile reads the packed rows: q/k/v and gate/up are never held twice."""
    model = _qwen3()
    linears = {name: _layer(model.model.layers[0], name) for group in GROUPS for name in group}
    values = {name: m.weight.detach().clone() for name, m in linears.items()}
    model = surogate.compile(model, recipe="bf16", arch="cpu")
    for group in GROUPS:
        packed = _base(_block(model), group[0]).w0
        for name in group:
            assert linears[name].weight.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr(), name
            assert torch.equal(linears[name].weight, values[name])
