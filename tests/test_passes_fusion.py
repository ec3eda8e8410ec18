"""Pass 3: horizontal fusion of linears sharing an input (pass 4, producer fusion: test_passes_producer.py)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from toy_layers import rms_norm

from surogate.ops.modules import SurogateLinear
from surogate.passes import PassContext, nodes, run_pipeline
from surogate.passes.capture import capture_graph


class Block(nn.Module):
    """RMSNorm (HF spelling) -> q, k, v; SwiGLU (gate, up) -> down."""

    def __init__(self, h: int = 128, n_kv: int = 128) -> None:
        super().__init__()
        self.norm, self.norm2 = nn.Parameter(torch.ones(h)), nn.Parameter(torch.full((h,), 0.5))
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h, False), nn.Linear(h, n_kv, False), nn.Linear(h, n_kv, False)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, 256, False), nn.Linear(h, 256, False), nn.Linear(256, h, False)

    def forward(self, x):
        h = rms_norm(x, self.norm)
        a = self.q_proj(h) + self.k_proj(h).sum(-1, keepdim=True) + self.v_proj(h).view(*h.shape[:-1], -1, 16).sum(-1).sum(-1, keepdim=True)
        h = rms_norm(a, self.norm2)
        return a + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))



TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _model(recipe: str | None = None, dropout: float = 0.0, n_kv: int = 128):
    torch.manual_seed(0)
    model = get_peft_model(Block(n_kv=n_kv).to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout,
                                      init_lora_weights=False))
    if recipe is not None:
        for name in TARGETS:
            layer = getattr(model.base_model.model, name)
            layer.base_layer = SurogateLinear.from_linear(layer.base_layer, recipe)
    return model


def _ops(gm) -> int:
    return sum(1 for n in gm.graph.nodes if nodes.is_surogate_op(n))


def _run(model, recipe: str, x, horizontal: bool = True):
    gm, inputs = capture_graph(model, x)
    ctx = PassContext(recipe, "cpu", options={"horizontal": horizontal})
    counts = run_pipeline(gm, ctx)
    return gm, inputs, counts, ctx.report


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("recipe", ["bf16", "qfp8"])
def test_horizontal_fuses_qkv_and_gate_up_with_same_numbers(recipe, monkeypatch):
    from surogate.passes import swiglu

    # qfp8's SwiGLU forward op needs the fused gate/up (passes/swiglu.py) and rounds h once where the unfused
    # graph's eager bf16 rounds silu(g) first: off here, so that both graphs compute the same forward.
    monkeypatch.setattr(swiglu, "FORWARD_OP", False)
    model = _model(None if recipe == "bf16" else recipe)
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    gm0, inputs0, _, _ = _run(model, recipe, x, horizontal=False)
    gm1, inputs1, counts, report = _run(model, recipe, x)
    assert counts["rewrite"] == 6 and counts["horizontal"] == 2
    assert _ops(gm0) == 6 and _ops(gm1) == 3  # qkv + gate/up + down
    fused = [members for what, members in report.groups if what.startswith("one GEMM")]
    assert sorted(len(m) for m in fused) == [2, 3]

    out0 = gm0(*inputs0)[0]
    out0.float().square().sum().backward()
    ref = _grads(model)
    model.zero_grad()
    out1 = gm1(*inputs1)[0]
    # Same quantized operands, same per-column sums: the outputs are equal; gradients differ only by the
    # order in which bf16 partial gradients are summed (and, for FP8 dgrad, per-row grad scales of the group).
    assert torch.equal(out1, out0)
    out1.float().square().sum().backward()
    for name, g in _grads(model).items():
        assert ((g - ref[name]).norm() / ref[name].norm()).item() < 1e-2, name


def test_horizontal_refuses_dropout_and_unaligned_fp8_blocks():
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    gm, _, counts, report = _run(_model(dropout=0.1), "bf16", x)
    assert counts["horizontal"] == 0 and _ops(gm) == 6
    assert any("dropout" in what for what, _ in report.groups)
    gm, _, counts, report = _run(_model("qfp8", n_kv=64), "qfp8", x)
    assert counts["horizontal"] == 1  # gate/up fuse (N=256); q/k/v refused (k, v have N=64)
    assert any("N % 128" in what for what, _ in report.groups)


def test_horizontal_refuses_fp8_row():
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    gm, _, counts, report = _run(_model("fp8"), "fp8", x)
    assert counts["horizontal"] == 0 and _ops(gm) == 6
    assert any("per-member scales" in what for what, _ in report.groups)


def _frozen_concatenations(recipe: str, packed: bool = True) -> tuple[list, list, str]:
    """(shapes of the concatenated frozen weights that the forward of a tiny compiled Qwen3 keeps for the
    backward, shapes of every frozen-weight concatenation in its forward and backward graphs), partitioned
    by Inductor's min-cut partitioner (the one CUDA training uses). `packed=False` undoes compile's
    packing before the first forward, so the pass concatenates in the graph."""
    from unittest import mock

    import transformers as T
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    import surogate
    import surogate.compiler as compiler
    from surogate import weight_packing

    kept: list[tuple[int, ...]] = []
    cats: list[tuple[int, ...]] = []

    def frozen_cats(graph):  # LoRA A is fp32: trainable, not frozen
        return [n for n in graph.nodes if n.target is torch.ops.aten.cat.default and n.meta["val"].dtype != torch.float32
                and n.meta["val"].dim() == 2 and n.meta["val"].shape[-1] == 256]

    def backend_with_partitioner(rec, arch, report, options=None, inductor=None):
        def backend(gm, example_inputs):
            run_pipeline(gm, PassContext(rec, arch, report, options or {}))

            def forward_compiler(fw, _inputs):
                outputs = next(n for n in fw.graph.nodes if n.op == "output").args[0]
                kept.extend(tuple(o.meta["val"].shape) for o in outputs if o in frozen_cats(fw.graph))
                cats.extend(tuple(n.meta["val"].shape) for n in frozen_cats(fw.graph))
                return fw

            def backward_compiler(bw, _inputs):
                cats.extend(tuple(n.meta["val"].shape) for n in frozen_cats(bw.graph))
                return bw

            return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler,
                                         bw_compiler=backward_compiler, partition_fn=min_cut_rematerialization_partition)
        return backend

    torch.manual_seed(0)
    cfg = T.Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, vocab_size=128)
    model = T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    with mock.patch.object(compiler, "make_backend", backend_with_partitioner):
        model = surogate.compile(model, recipe=recipe, arch="cpu")
        if not packed:
            assert weight_packing.unpack(model) == 5  # q, k, v, gate, up
        ids = torch.randint(0, 128, (1, 32))
        model(input_ids=ids, labels=ids).loss.backward()
    return kept, cats, str(model.surogate_report)


@pytest.mark.parametrize("recipe", ["bf16", "qfp8"])
def test_packed_weights_are_never_concatenated_or_held(recipe):
    """compile packs q/k/v and gate/up once: no frozen weight is copied in the step, none held for the backward."""
    kept, cats, report = _frozen_concatenations(recipe)
    assert report.count("one GEMM over the packed weights") == 2, report
    assert kept == [] and cats == []


def test_unpacked_groups_keep_or_recompute_the_concatenated_weights():
    """Without packing the pass concatenates in the graph: bf16 keeps the q/k/v and gate/up concatenations
    (no second copy per step); qfp8, which frees the bf16 copy to save memory, copies them again in the
    backward instead of holding them."""
    kept, cats, _ = _frozen_concatenations("bf16", packed=False)
    assert sorted(kept) == [(512, 256), (1024, 256)] and sorted(cats) == [(512, 256), (1024, 256)]
    kept, cats, _ = _frozen_concatenations("qfp8", packed=False)
    assert kept == [] and sorted(cats) == [(512, 256), (512, 256), (1024, 256), (1024, 256)]  # forward + again


def _copied_pieces(gm) -> list[list[bool]]:
    """Per fused GEMM's split, per member: whether the member's piece goes through a `.contiguous()` copy."""
    out = []
    for split in (n for n in gm.graph.nodes if n.target is torch.split):
        pieces = sorted(split.users, key=lambda n: n.args[1])
        out.append([any(u.op == "call_method" and u.target == "contiguous" for u in p.users) for p in pieces])
    return out


def test_only_a_piece_read_elementwise_skips_the_contiguous_copy():
    """q (added), gate and up (SiLU, multiply) read their column slice of the fused output in place; k (summed: not
    in the elementwise list) and v (`.view`ed: a slice may not take every view) get a contiguous copy, which
    Inductor folds into their consumers. A copy of gate and up, which SwiGLU's backward saves, was materialized
    beside the activation (two more passes over (M, intermediate) a layer)."""
    gm, inputs, counts, _ = _run(_model(), "bf16", torch.randn(2, 3, 128, dtype=torch.bfloat16))
    assert counts["horizontal"] == 2
    assert sorted(_copied_pieces(gm), key=len) == [[False, False], [False, True, True]]


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd is returning a function")
@pytest.mark.parametrize("recipe", ["bf16", "qfp8"])
def test_swiglu_forward_writes_only_its_output(recipe, monkeypatch):
    """In the compiled tiny Qwen3's forward Inductor's SwiGLU kernel (rows x intermediate elements) writes one bf16
    tensor, the activation (qfp8: also its FP8 copy and scales, the producer's quantize), not copies of gate
    and up for the backward. (qfp8 runs `surogate::swiglu_forward` there by default, passes/swiglu.py FORWARD_OP,
    tests/test_swiglu.py; this is Inductor's plan without it.)"""
    pytest.importorskip("triton")
    from inductor_kernels import tiny_qwen3_kernels

    from surogate.passes import swiglu

    monkeypatch.setattr(swiglu, "FORWARD_OP", False)

    forward, _ = tiny_qwen3_kernels(recipe)
    # 2 x s rows x 512: a pointwise kernel (numel, 1), or qfp8's 1x128-block reduction (numel / 128, 128); the
    # sequence length's symbol is s26 on transformers 5.25, s29 on 5.17
    swiglu = [k for k in forward if re.fullmatch(r"1024\*s\d+", str(k.group[0] * k.group[1]))
              and torch.bfloat16 in k.dtypes]
    assert len(swiglu) == 1, [(k.group, k.dtypes) for k in forward]
    assert swiglu[0].dtypes.count(torch.bfloat16) == 1, swiglu
    assert (torch.float8_e4m3fn in swiglu[0].dtypes) == (recipe == "qfp8"), swiglu
