"""Chunked LM head + cross-entropy against HF's ForCausalLMLoss: loss and gradients, odd chunkings; the
fused path's GEMM count (one logits GEMM per chunk, none in the backward) and its graph under torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from transformers.loss.loss_utils import ForCausalLMLoss

from surogate.ops import loss as loss_mod
from surogate.ops.loss import chunk_rows, lm_head_cross_entropy

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def _data(b=2, s=7, h=24, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, :3] = -100
    return hidden, weight, labels


def _hf(hidden, weight, labels, softcap=None, num_items=None):
    logits = F.linear(hidden, weight)
    if softcap:
        logits = torch.tanh(logits.float() / softcap) * softcap
    return ForCausalLMLoss(logits, labels, vocab_size=weight.shape[0], num_items_in_batch=num_items)


@pytest.mark.parametrize("chunk", [1, 5, 14, 1000])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_matches_hf_loss_and_grads(chunk, softcap):
    hidden, weight, labels = _data()
    ref = _hf(hidden, weight, labels, softcap)
    ref.backward()
    ref_gh, ref_gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = lm_head_cross_entropy(hidden, weight, labels, softcap=softcap, chunk=chunk)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    # bf16 grads: the last GEMM rounds to bf16 in both; allow one bf16 ulp.
    torch.testing.assert_close(hidden.grad, ref_gh, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(weight.grad, ref_gw, rtol=1e-2, atol=1e-3)


def test_num_items_in_batch_and_frozen_head():
    hidden, weight, labels = _data(seed=1)
    weight.requires_grad_(False)
    ref = _hf(hidden, weight, labels, num_items=torch.tensor(40))
    loss = lm_head_cross_entropy(hidden, weight, labels, num_items_in_batch=torch.tensor(40), chunk=3)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(lm_head_cross_entropy(hidden, weight, labels, num_items_in_batch=40, chunk=3), loss)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None


def test_bias_and_all_ignored():
    hidden, weight, labels = _data(seed=2)
    bias = torch.randn(weight.shape[0]).to(torch.bfloat16)
    ref = ForCausalLMLoss(F.linear(hidden, weight, bias), labels, vocab_size=weight.shape[0])
    torch.testing.assert_close(lm_head_cross_entropy(hidden, weight, labels, bias=bias, chunk=4), ref,
                               rtol=1e-5, atol=1e-5)
    # HF returns 0/0 = NaN for a batch without targets, which poisons accumulated gradients; here: 0, no gradient.
    h = hidden.detach().clone().requires_grad_(True)  # a leaf: a non-leaf's .grad is always None
    empty = lm_head_cross_entropy(h, weight, torch.full_like(labels, -100))
    empty.backward()
    assert empty.item() == 0.0 and (h.grad is None or not h.grad.any())


def test_shape_error_and_chunk_heuristic():
    hidden, weight, labels = _data()
    with pytest.raises(ValueError, match="labels"):
        lm_head_cross_entropy(hidden, weight, labels[:, :3])
    # 256 MiB of bf16 logits a chunk, twice the rows of the old 256 MiB of FP32 logits
    assert chunk_rows(151936) == 883 and chunk_rows(151936) * 151936 * 2 <= 256 * 2**20
    assert chunk_rows(262144) == 512 and chunk_rows(10) >= 16


def test_opcheck():
    hidden, weight, labels = _data(b=1, s=5)
    flat, shifted = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    for need_weight_grad in (False, True):
        torch.library.opcheck(torch.ops.surogate.lm_head_ce_fused.default,
                              (flat, weight, None, shifted, torch.tensor(0.25), 3.0, 2, need_weight_grad),
                              test_utils=utils)
    bias = torch.randn(weight.shape[0]).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.surogate.lm_head_ce.default,
                          (flat.detach(), weight.detach(), bias, shifted, 0.0, 2), test_utils=utils[:2])


# --- numerics against HF, over dtypes, bias, frozen head, odd chunks, softcap --------------------

def _hf_upcast(hidden, weight, labels, bias, softcap):
    """HF's loss: the logits GEMM in the model dtype, upcast, (capped,) fp32 cross_entropy, mean."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return ForCausalLMLoss(logits, labels, vocab_size=weight.shape[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_matches_hf_across_dtypes(dtype, softcap, bias, train_head):
    g = torch.Generator().manual_seed(7)
    b, s, h, v = 2, 13, 40, 301
    hidden = (torch.randn(b, s, h, generator=g)).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype).requires_grad_(train_head)
    bias_t = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, 1:7] = -100  # shifted: rows 0-5 ignored, i.e. the whole first chunk of 5 and one more
    ref = _hf_upcast(hidden, weight, labels, bias_t, softcap)
    ref_grads = torch.autograd.grad(ref, [hidden, weight] if train_head else [hidden])
    loss = lm_head_cross_entropy(hidden, weight, labels, bias=bias_t, softcap=softcap, chunk=5)  # 26 = 5 x 5 + 1
    grads = torch.autograd.grad(loss, [hidden, weight] if train_head else [hidden])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        if dtype == torch.float32:  # the same FP32 math, summed in another order
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            continue
        # bf16: both round (p - y) / n to bf16 before the dgrad GEMM and the GEMM's output once, but the FP32
        # values before each rounding differ by an ulp or so (exp, sums in another order), so an entry may
        # land one bf16 ulp (2**-7 relative) away at each; sums that cancel are compared against the
        # tensor's largest entry.
        torch.testing.assert_close(got, want, rtol=2**-6, atol=2**-8 * want.abs().max().item())
        assert (got.float() - want.float()).norm() <= 2**-7 * want.float().norm()


def test_no_targets_with_a_trained_head_gives_zero_loss_and_zero_grads():
    hidden, weight, labels = _data(seed=4)
    h = hidden.detach().clone().requires_grad_()
    loss = lm_head_cross_entropy(h, weight, torch.full_like(labels, -100), chunk=3)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not weight.grad.any()


# --- work done: one logits GEMM per chunk in the forward, none in the backward ---------------------

def _gemms(prof) -> int:
    return sum(e.name in GEMMS for e in prof.events())


@pytest.mark.parametrize("train_head", [False, True])
def test_fused_path_runs_one_logits_gemm_per_chunk_and_a_backward_without_gemms(monkeypatch, train_head):
    hidden, weight, labels = _data(b=2, s=11)
    weight.requires_grad_(train_head)
    calls, logits = [], loss_mod._logits
    monkeypatch.setattr(loss_mod, "_logits", lambda *a: calls.append(a[0].shape[0]) or logits(*a))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as forward:
        loss = lm_head_cross_entropy(hidden, weight, labels, chunk=4)  # 22 rows: 4+4+4+4+4+2
    assert calls == [4, 4, 4, 4, 4, 2]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as backward:
        loss.backward()
    assert len(calls) == 6 and _gemms(backward) == 0  # no logits recomputed, no GEMM at all
    assert not any(e.name.startswith("surogate::") for e in backward.events())
    # per chunk: the logits GEMM, the dgrad GEMM, and with a trained head the weight-gradient GEMM
    assert _gemms(forward) == 6 * (3 if train_head else 2)
    names = {e.name for e in forward.events()}
    assert "surogate::lm_head_ce_fused" in names and "surogate::lm_head_ce" not in names
    assert hidden.grad is not None and (weight.grad is not None) == train_head


def test_without_gradient_the_loss_only_op_runs_with_the_same_loss():
    hidden, weight, labels = _data(seed=6)
    with_grad = lm_head_cross_entropy(hidden, weight, labels, softcap=3.0, chunk=4)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        no_grad = lm_head_cross_entropy(hidden, weight, labels, softcap=3.0, chunk=4)
    names = {e.name for e in prof.events()}
    assert "surogate::lm_head_ce" in names and "surogate::lm_head_ce_fused" not in names
    assert _gemms(prof) == 4  # 14 rows in chunks of 4: one logits GEMM each, no dgrad
    assert torch.equal(no_grad, with_grad.detach())
    frozen = lm_head_cross_entropy(hidden.detach(), weight.detach(), labels, softcap=3.0, chunk=4)
    assert not frozen.requires_grad and torch.equal(frozen, no_grad)


# --- under torch.compile: one node, a backward of scaling only, the eager numbers -----------------

def test_compiled_matches_eager_with_one_fused_node_and_no_backward_gemm():
    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm)
        return compiler

    def step(hidden, weight, labels, num_items):
        return lm_head_cross_entropy(hidden, weight, labels, softcap=3.0, num_items_in_batch=num_items, chunk=5)

    hidden, weight, labels = _data(b=2, s=9, seed=8)
    eager = step(hidden, weight, labels, torch.tensor(11))
    eager_grads = torch.autograd.grad(eager, [hidden, weight])
    compiled = torch.compile(step, backend=aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")))
    loss = compiled(hidden, weight, labels, torch.tensor(11))
    grads = torch.autograd.grad(loss, [hidden, weight])
    assert torch.equal(loss, eager)
    for got, want in zip(grads, eager_grads):
        assert torch.equal(got, want)
    targets = {name: [n.target for n in gm.graph.nodes if n.op == "call_function"] for name, gm in graphs.items()}
    assert targets["forward"].count(torch.ops.surogate.lm_head_ce_fused.default) == 1
    assert not any(str(t).startswith(("surogate.", "aten.mm", "aten.addmm")) for t in targets["backward"])


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_the_head_on_the_labelled_rows_only_equals_every_row(softcap):
    """Chat data masks the prompt: with the data's bound on labelled tokens the head runs on those rows only
    (padded to a multiple of 64 with an always-ignored row), and the loss and both gradients are those of the head
    over every row, in training and in eval; no compaction where it would not cut the rows below 90%."""
    g = torch.Generator().manual_seed(3)
    b, s, h, v = 3, 100, 24, 37
    hidden = torch.randn(b, s, h, generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(torch.bfloat16).requires_grad_()
    labels = torch.full((b, s), -100)
    for row, (start, stop) in enumerate([(60, 90), (10, 30), (75, 100)]):  # answers after masked prompts
        labels[row, start:stop] = torch.randint(0, v, (stop - start,), generator=g)
    labelled = int((labels[:, 1:] != -100).sum())  # 75
    assert loss_mod.compacted_rows(b * s, labelled) == 128 and loss_mod.compacted_rows(b * s, 280) is None
    results = []
    for bound in (None, labelled, 200):  # every row; 128 rows; 256 rows
        hidden.grad = weight.grad = None
        loss = lm_head_cross_entropy(hidden, weight, labels, softcap=softcap, chunk=40, max_trained=bound)
        loss.backward()
        with torch.no_grad():
            eval_loss = lm_head_cross_entropy(hidden, weight, labels, softcap=softcap, chunk=40, max_trained=bound)
        results.append((loss.detach(), eval_loss, hidden.grad.clone(), weight.grad.clone()))
    for (loss, eval_loss, grad_hidden, grad_weight), want in zip(results[1:], results[:1] * 2):
        torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(eval_loss, want[1], rtol=1e-5, atol=1e-6)
        assert torch.equal(grad_hidden, want[2])  # row by row: the same products
        # the weight's gradient sums bf16 chunk products in FP32: other chunks, other roundings (one bf16 ulp)
        torch.testing.assert_close(grad_weight, want[3], rtol=1e-2, atol=1e-3)
    rows = loss_mod.trained_rows(F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1), labelled)
    assert rows.shape == (128,) and (rows[75:] == b * s - 1).all()  # the fill: the last row, never labelled
    # a bound below the labelled tokens (64 rows for 75): a NaN loss, in training and eval, with or without
    # num_items_in_batch, where the rows past the bound would have left the loss quietly
    for items in (None, labelled, torch.tensor(labelled)):
        loss = lm_head_cross_entropy(hidden, weight, labels, chunk=40, max_trained=60, num_items_in_batch=items)
        with torch.no_grad():
            eval_loss = lm_head_cross_entropy(hidden, weight, labels, chunk=40, max_trained=60,
                                              num_items_in_batch=items)
        assert loss.isnan() and eval_loss.isnan()
        assert not lm_head_cross_entropy(hidden, weight, labels, chunk=40, max_trained=labelled,
                                         num_items_in_batch=items).isnan()  # 128 rows: room for 75


def test_a_compiled_model_trains_the_same_under_the_bound(monkeypatch):
    """`surogate.forward.bound_trained_tokens` on a compiled model: its head runs on the labelled rows only, and
    the loss and every LoRA gradient are those without the bound (the hidden states' gradient is the same row by
    row), the bound a number or a function of the batch's width; a bound below the labelled tokens gives a NaN
    loss; a model without the chunked head, or unloaded, takes no bound."""
    import transformers as T

    import surogate
    from surogate.forward import bound_trained_tokens

    config = T.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=96)
    torch.manual_seed(0)
    model = surogate.compile(T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16), recipe="bf16", arch="cpu")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 80), generator=g)
    labels = ids.clone()
    labels[:, :60] = -100  # the prompt
    head_rows = []
    rows_of = loss_mod.trained_rows
    monkeypatch.setattr(loss_mod, "trained_rows", lambda *a: head_rows.append(rows_of(*a)) or head_rows[-1])
    runs = []
    for bound in (None, 40, lambda width: {80: 40}.get(width)):  # a number, or one per width (padded batches)
        assert bound_trained_tokens(model, bound)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), *bounded = runs
    assert head_rows[0] is None and head_rows[1].shape == head_rows[2].shape == (64,)  # 40 labelled, the fill
    longer = ids.clone()
    longer[:, :20] = -100  # 120 labelled tokens, 64 rows kept for the bound 40: NaN, not a quiet loss
    assert bound_trained_tokens(model, 40) and model(input_ids=ids, labels=longer).loss.isnan()
    for bounded_loss, bounded_grads in bounded:
        torch.testing.assert_close(bounded_loss, loss, rtol=1e-6, atol=0)
        assert grads.keys() == bounded_grads.keys() and all(torch.equal(grads[n], bounded_grads[n]) for n in grads)
    torch.manual_seed(0)
    plain = surogate.compile(T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16), recipe="bf16", arch="cpu",
                             chunked_loss=False)
    assert not bound_trained_tokens(plain, 40)
    assert not bound_trained_tokens(model.merge_and_unload(), 40)
