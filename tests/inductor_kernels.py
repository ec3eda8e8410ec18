"""The kernels Inductor's Triton scheduler would emit for a compiled function, found on a machine without a GPU.

Inductor plans the same fusions for CPU tensors with `cpu_backend="triton"` as for CUDA ones (the SIMD
scheduler both share); only writing the Triton code needs a driver. So `triton_kernels` compiles with that
backend, records the scheduler's fused nodes when codegen starts, and stops there. What differs from CUDA:
on the CPU `aten.cat` always lowers to a ConcatKernel (CUDA may lower it pointwise), and device-sized
heuristics (split reductions) see no GPU. For the compiled tiny Qwen3 of tests/gpu/test_grad_producer_gpu.py
this reproduced the H200's backward launches with grad_producer on and off (run 56: qfp8 8 more, fp8 fewer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Kernel:
    """One Triton kernel of the plan: its group ((numel, rnumel)), and per scheduler node what it writes."""

    group: tuple
    dtypes: tuple[torch.dtype | None, ...]
    reductions: int

    def writes(self, *dtypes: torch.dtype) -> bool:
        return any(d in dtypes for d in self.dtypes)


class _Stop(Exception):
    pass


def _kernel(node) -> Kernel:
    dtypes, reductions = [], 0
    for n in node.get_nodes():
        try:
            dtypes.append(n.node.get_dtype())
        except Exception:  # a multi-output node has no single dtype
            dtypes.append(None)
        reductions += bool(n.is_reduction())
    return Kernel(tuple(node.group[1]), tuple(dtypes), reductions)


@contextlib.contextmanager
def recording() -> Iterator[list[list[Kernel]]]:
    """Inside the block, every graph Inductor compiles records its kernels (one list per graph) and is not
    built: the compile raises at codegen (callers catch it; `triton_kernels` does)."""
    from torch._inductor import scheduler as S

    graphs: list[list[Kernel]] = []
    original = S.Scheduler.codegen

    def codegen(self):
        graphs.append([_kernel(n) for n in self.nodes if not isinstance(
            n, (S.ExternKernelSchedulerNode, S.NopKernelSchedulerNode))])
        raise _Stop

    S.Scheduler.codegen = codegen
    try:
        with torch._inductor.config.patch(cpu_backend="triton", fx_graph_cache=False):
            yield graphs
    finally:
        S.Scheduler.codegen = original


def recording_inductor(gm: torch.fx.GraphModule, example_inputs):
    """A stand-in for `compile_fx` inside `recording()`: Inductor plans every graph (forward and, when the
    backward runs, backward), then each runs uncompiled, so a whole training step goes through."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    def inner(graph: torch.fx.GraphModule, inputs, **kwargs):
        try:
            return compile_fx_inner(graph, inputs, **kwargs)
        except Exception as e:  # our _Stop, possibly wrapped by Inductor
            if not any(isinstance(x, _Stop) for x in (e, e.__cause__, getattr(e, "inner_exception", None))):
                raise
            return make_boxed_func(graph.forward)

    return compile_fx(gm, example_inputs, inner_compile=inner)


def triton_kernels(fn: Callable, *args: torch.Tensor) -> list[Kernel]:
    """The Triton kernels Inductor would emit for `fn(*args)` (one graph: forward only)."""
    torch._dynamo.reset()
    with recording() as graphs:
        with contextlib.suppress(Exception):
            torch.compile(fn, fullgraph=True)(*args)
    torch._dynamo.reset()
    if len(graphs) != 1:
        raise RuntimeError(f"expected one compiled graph, Inductor planned {len(graphs)}")
    return graphs[0]


def tiny_qwen3_kernels(recipe: str, **compile_options) -> tuple[list[Kernel], list[Kernel]]:
    """(forward, backward): the Triton kernels Inductor plans for the block of the GPU tests' tiny Qwen3 (hidden
    256, intermediate 512, 2 x 128 rows, bf16, LoRA r=8) compiled by surogate on the CPU with Inductor in place
    of aot_eager; `compile_options` go to `surogate.compile`."""
    import transformers as T

    cfg = T.Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, vocab_size=512)
    forward, backward = tiny_model_kernels(cfg, recipe, **compile_options)  # one block graph each way
    return forward, backward


def tiny_model_kernels(cfg, recipe: str, **compile_options) -> list[list[Kernel]]:
    """The kernel plans, as `tiny_qwen3_kernels`, of every graph a training step of a model built from `cfg` (a
    transformers config; its `vocab_size` ids, 2 x 128 rows) compiles: the block graphs' forwards, then their
    backwards (one block graph each way, or one per kind of block, e.g. Gemma-2's local and global layers)."""
    from unittest import mock

    import transformers as T

    import surogate
    from surogate.compiler import _attach_lora

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _attach_lora(T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16),
                         {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    compiled = surogate.compile(model, recipe=recipe, arch="cpu", **compile_options)
    ids = torch.randint(0, cfg.vocab_size, (2, 128), generator=torch.Generator().manual_seed(1))
    lookup = torch._dynamo.lookup_backend
    with recording() as graphs, mock.patch.object(
            torch._dynamo, "lookup_backend", lambda name: recording_inductor if name == "aot_eager" else lookup(name)):
        compiled(input_ids=ids, labels=ids).loss.backward()
    torch._dynamo.reset()
    return graphs


def tiny_qwen3_post_grad(recipe: str) -> tuple[list[dict[str, int]], list[Kernel], list[Kernel]]:
    """(per compiled graph, what each of surogate's post-grad passes rewrote; the forward's and the backward's
    kernel plans) of the tiny Qwen3 (`tiny_qwen3_kernels`), the passes run as compile runs them
    (surogate/passes/post_grad.py)."""
    from torch._inductor import config

    from surogate.passes import post_grad

    counts: list[dict[str, int]] = []
    inner = post_grad.post_grad_pass()

    class Counting(type(inner)):
        def __call__(self, graph):
            counts.append(post_grad.run(graph))

    with config.patch(post_grad_custom_post_pass=Counting()):
        forward, backward = tiny_qwen3_kernels(recipe)
    return counts, forward, backward
