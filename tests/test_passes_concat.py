"""surogate/passes/concat.py: which cats become `surogate::concat` (Inductor's ConcatKernel), on hand-made
graphs and in the compiled tiny Qwen3, and that Inductor plans the SwiGLU backward into the cat's slices as
one kernel. The lowering's numbers (ConcatKernel vs the masked cat, bit for bit) are checked on the GPU
(tests/gpu/test_concat_gpu.py): on the CPU Inductor always lowers cat as a ConcatKernel."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from inductor_kernels import tiny_model_kernels, tiny_qwen3_kernels
from surogate.passes import op_grad_quantize, concat, post_grad, swiglu

CONCAT = torch.ops.surogate.concat.default
CAT = torch.ops.aten.cat.default


def _rewritten(fn, *shapes) -> tuple[int, list]:
    gm = make_fx(fn, tracing_mode="fake")(*[torch.randn(s, dtype=torch.bfloat16) for s in shapes])
    count = concat.realize_cats_into_slices(gm.graph)
    return count, [n.target for n in gm.graph.nodes if n.target in (CAT, CONCAT)]


def test_a_computed_feature_cat_that_a_surogate_op_reads_becomes_concat() -> None:
    # surogate::concat itself stands in for the surogate GEMM op reading the cat.
    count, cats = _rewritten(lambda a, b: CONCAT([torch.cat([a * 2, b + 1], -1)], 0), (4, 8), (4, 8))
    assert count == 1 and cats == [CONCAT, CONCAT]
    assert torch.equal(concat.concat([torch.ones(2, 3), torch.zeros(2, 1)], 1), torch.cat([torch.ones(2, 3),
                                                                                          torch.zeros(2, 1)], 1))


def test_other_cats_are_left_to_inductor() -> None:
    read = lambda t: CONCAT([t], 0)  # noqa: E731  (a surogate op reading the cat)
    cases = {
        "graph inputs": lambda a, b: read(torch.cat([a, b], -1)),
        "along rows": lambda a, b: read(torch.cat([a * 2, b + 1], 0)),
        "only pointwise readers (RoPE's rotate_half)": lambda a, b: torch.cat([-a, b], -1) * 3,
        "mixed dtypes": lambda a, b: read(torch.cat([a * 2, (b + 1).float()], -1)),
    }
    for why, fn in cases.items():
        count, cats = _rewritten(fn, (4, 8), (4, 8))
        assert count == 0 and CAT in cats, why


def test_disabled_gives_inductor_no_pass(monkeypatch) -> None:
    assert concat.lowered()  # this torch has the Inductor API the pass needs (compat.register_concat_lowering)
    assert post_grad.post_grad_pass() is not None and post_grad.post_grad_pass().uuid() is not None
    monkeypatch.setattr(concat, "ENABLED", False)
    assert post_grad.post_grad_pass() is not None  # swiglu.py's and op_grad_quantize.py's steps still run
    monkeypatch.setattr(swiglu, "ENABLED", False)
    monkeypatch.setattr(op_grad_quantize, "ENABLED", False)
    assert post_grad.post_grad_pass() is None


def test_an_inductor_without_the_lowering_gets_no_pass_and_no_rewrite(monkeypatch) -> None:
    """Where compat.register_concat_lowering finds no Inductor API, nothing is handed to Inductor and no cat is
    rewritten into an op it could not lower."""
    monkeypatch.setattr(concat, "lowered", lambda: False)
    monkeypatch.setattr(swiglu, "ENABLED", False)
    monkeypatch.setattr(op_grad_quantize, "ENABLED", False)
    assert post_grad.post_grad_pass() is None
    count, cats = _rewritten(lambda a, b: CONCAT([torch.cat([a * 2, b + 1], -1)], 0), (4, 8), (4, 8))
    assert count == 0 and cats == [CAT, CONCAT]


def test_a_users_own_post_grad_pass_still_runs_after_ours() -> None:
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    ran = []

    class Theirs(CustomGraphPass):
        def __call__(self, graph):
            ran.append(sum(n.target is CONCAT for n in graph.nodes))

        def uuid(self):
            return "theirs-1"

    with config.patch(post_grad_custom_post_pass=Theirs()):  # not monkeypatch: its undo deletes the key
        ours = post_grad.post_grad_pass()
    gm = make_fx(lambda a, b: CONCAT([torch.cat([a * 2, b + 1], -1)], 0), tracing_mode="fake")(
        torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16))
    ours(gm.graph)
    assert ran == [2]  # theirs saw the graph after our rewrite
    assert ours.uuid()[-1] == "theirs-1"  # and its key is part of ours (Inductor's cache)


def _plan_with_pass(recipe: str, model_config=None):
    """(forward, backward) kernel plans of the tiny Qwen3 (or a model of `config`) with the pass as Inductor's
    post-grad pass, and per graph the readers of each surogate::concat node it left."""
    from torch._inductor import config

    seen = []
    inner = post_grad.post_grad_pass()

    class Recording(type(inner)):
        def __call__(self, graph):
            inner(graph)
            seen.append([sorted(str(u.target) for u in n.users) for n in graph.nodes if n.target is CONCAT])

    with config.patch(post_grad_custom_post_pass=Recording()):
        plans = tiny_qwen3_kernels(recipe) if model_config is None else tiny_model_kernels(model_config, recipe)
    return plans, seen


def test_the_fused_gemms_gradient_cats_become_concat_in_the_compiled_backward() -> None:
    (forward, backward), (fwd_concats, bwd_concats) = _plan_with_pass("bf16")
    assert fwd_concats == []  # the forward's cats are of weights / LoRA factors (graph inputs, along rows)
    # gate/up's SwiGLU gradients and q/k/v's gradients, each read by the fused GEMM's backward op
    assert bwd_concats == [["surogate.lora_linear_backward.default"]] * 2
    # Inductor planned the SwiGLU backward into the cat's two slices as one kernel: M x intermediate
    # (2 x 128 x 512) elements, two bf16 stores.
    rows, inter = 2 * 128, 512
    swiglu = [k for k in backward if _numel(k.group) == rows * inter and k.dtypes == (torch.bfloat16,) * 2]
    assert len(swiglu) == 1, backward


def test_qfp8s_gradient_cat_becomes_concat_read_by_the_op_alone() -> None:
    """q/k/v's (gate/up's gradient is one op's output in qfp8: passes/swiglu.py); the op quantizes it itself
    (passes/op_grad_quantize.py), so no quantizer in the graph reads it."""
    _, (_, bwd_concats) = _plan_with_pass("qfp8")
    assert bwd_concats == [["surogate.lora_linear_backward.default"]], bwd_concats


def _numel(group: tuple) -> int:
    """numel of a kernel group whose first entry is a sympy expression in the sequence length (128 here)."""
    import sympy

    n = group[0]
    return int(n.subs({s: 128 for s in n.free_symbols})) if isinstance(n, sympy.Expr) else int(n)


# Per architecture, the gradient cats a block's backward reads into fused GEMMs: q/k/v and gate/up where they are
# separate linears (Llama, Gemma-2 with its two kinds of layers); OPT: q/k/v (with biases), no gated MLP; Phi-3:
# its own gate_up_proj's output chunked into gate and up (qkv_proj's split feeds the attention, no cat read by
# a GEMM); Falcon (parallel attention): query_key_value and dense_h_to_4h read the same norm output and fuse.
ARCH_CONCATS = {"llama": 2, "gemma2": 2, "phi3": 1, "opt": 1, "falcon": 1}


@pytest.mark.parametrize("name", sorted(ARCH_CONCATS))
def test_inductor_plans_the_concats_on_other_architectures(name) -> None:
    from test_compile_models import tiny_config

    cfg = tiny_config(name)
    for key in ("max_position_embeddings", "n_positions"):  # the plans run 128-token rows
        if hasattr(cfg, key):
            setattr(cfg, key, 128)
    plans, seen = _plan_with_pass("bf16", cfg)
    assert all(plans) and len(seen) == len(plans) and len(plans) % 2 == 0, (len(plans), seen)
    # A forward and a backward per kind of block (Gemma-2: two): the forwards have no concat, each backward
    # has the architecture's.
    assert sum(s == [] for s in seen) == len(seen) // 2, seen
    assert all(s == [["surogate.lora_linear_backward.default"]] * ARCH_CONCATS[name] for s in seen if s), seen
