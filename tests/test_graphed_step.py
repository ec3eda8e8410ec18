"""GraphedStep's bookkeeping on CPU: `EagerCapture` stands in for the CUDA graph (it runs the recorded
micro-step at each replay), so warm-up, gradient binding, shape fallback and capture failure are
checked against a plain eager loop. tests/gpu/test_graphed_step_gpu.py replays real CUDA graphs."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
import torch.utils._python_dispatch
from torch import nn

from surogate.training.config import TrainConfig
from surogate.training.graphed_step import EagerCapture, GraphedStep
from surogate.training.steps import MicroStep


class TinyLM(nn.Module):
    """Embedding -> LoRA-style trainable pair -> logits; returns an object with `.loss` like HF."""

    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim).requires_grad_(False)
        self.a = nn.Parameter(torch.randn(4, dim) * 0.3)
        self.b = nn.Parameter(torch.randn(dim, 4) * 0.3)
        self.head = nn.Linear(dim, vocab, bias=False).requires_grad_(False)

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        h = h + h @ self.a.t() @ self.b.t()
        logits = self.head(h)
        loss = None if labels is None else nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return types.SimpleNamespace(loss=loss)


def _batches(n: int, shape=(2, 8), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, 32, shape, generator=g)), "labels": ids.roll(1, -1)}
            for _ in range(n)]


def _eager_grads(model: nn.Module, batches, scale: float) -> list[torch.Tensor]:
    for b in batches:
        (model(**b).loss * scale).backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _pair():
    torch.manual_seed(0)
    model = TinyLM()
    return model, copy.deepcopy(model)


def test_replayed_steps_accumulate_like_eager_and_warmup_leaves_no_trace():
    model, ref = _pair()
    batches = _batches(3)
    step = GraphedStep(model, loss_scale=1 / 3, warmup=2, capture=EagerCapture(), pad_to=1)
    losses = [step(**b).clone() for b in batches]
    expected = _eager_grads(ref, batches, 1 / 3)
    for g, e in zip(_grads(model), expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert step.replays == 3 and step.eager_calls == 0
    assert losses[0] == ref(**batches[0]).loss.detach()


def test_capture_in_mid_step_keeps_the_gradients_already_accumulated():
    model, ref = _pair()
    batches = _batches(2)
    (model(**batches[0]).loss * 0.5).backward()  # an eager micro-batch first
    step = GraphedStep(model, loss_scale=0.5, capture=EagerCapture(), pad_to=1)
    step(**batches[1])
    for g, e in zip(_grads(model), _eager_grads(ref, batches, 0.5)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_optimizer_steps_with_zero_grad_match_eager(set_to_none):
    model, ref = _pair()
    step = GraphedStep(model, loss_scale=0.5, capture=EagerCapture(), pad_to=1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt_ref = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    buffers = None
    for k in range(3):
        batches = _batches(2, seed=k)
        for b in batches:
            step(**b)
        for b in batches:
            (ref(**b).loss * 0.5).backward()
        buffers = buffers or [p.grad for p in model.parameters() if p.requires_grad]
        assert all(p.grad is g for p, g in zip((p for p in model.parameters() if p.requires_grad), buffers))
        opt.step(), opt_ref.step()
        opt.zero_grad(set_to_none=set_to_none), opt_ref.zero_grad(set_to_none=set_to_none)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_each_shape_bucket_gets_its_own_graph_and_the_same_gradients():
    model, ref = _pair()
    first, odd = _batches(1)[0], _batches(1, shape=(1, 5), seed=3)[0]
    step = GraphedStep(model, capture=EagerCapture(), pad_to=1)
    step(**first)
    step(**odd)
    step(**first)
    assert len(step.graphs) == 2 and step.replays == 3 and step.eager_calls == 0
    for g, e in zip(_grads(model), _eager_grads(ref, [first, odd, first], 1.0)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_rows_pad_to_their_bucket_and_shorter_rows_leave_no_trace():
    """Lengths 5, 7 and 3 share the bucket of 8: one graph; the loss and gradients are those of the
    unpadded rows (labels -100 on the padding; the tail of a longer call is overwritten by padding)."""
    model, ref = _pair()
    batches = [_batches(1, shape=(2, n), seed=n)[0] for n in (5, 7, 3)]
    step = GraphedStep(model, capture=EagerCapture(), pad_to=8)
    losses = [step(**b).clone() for b in batches]
    assert len(step.graphs) == 1 and step.replays == 3
    assert next(iter(step.graphs.values())).inputs["labels"].shape == (2, 8)
    for loss, b in zip(losses, batches):
        torch.testing.assert_close(loss, ref(**b).loss.detach(), rtol=1e-6, atol=0)
    for g, e in zip(_grads(model), _eager_grads(ref, batches, 1.0)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_padded_length_rule():
    from surogate.training.buckets import padded_length

    assert [padded_length(n, (), 128) for n in (1, 127, 128, 129, 600)] == [128, 128, 128, 256, 640]
    assert padded_length(1000, (), 128, limit=1024) == 1024 and padded_length(1000, (), 128, limit=1000) == 1000
    assert padded_length(77, (), 1) == 77
    assert [padded_length(n, (16, 48), 128) for n in (1, 16, 17, 48, 49)] == [16, 16, 48, 48, 128]


def test_given_buckets_decide_the_graphs_and_the_numbers_stay_those_of_the_rows():
    """Buckets (6, 12): lengths 3 and 5 share the graph of 6, 9 gets 12, 13 (past them) the multiple of pad_to."""
    model, ref = _pair()
    batches = [_batches(1, shape=(2, n), seed=n)[0] for n in (5, 3, 9, 13)]
    step = GraphedStep(model, capture=EagerCapture(), pad_to=8, buckets=[12, 6, 6])
    assert step.buckets == (6, 12)
    losses = [step(**b).clone() for b in batches]
    assert sorted(g.inputs["labels"].shape[1] for g in step.graphs.values()) == [6, 12, 16]
    for loss, b in zip(losses, batches):
        torch.testing.assert_close(loss, ref(**b).loss.detach(), rtol=1e-6, atol=0)
    for g, e in zip(_grads(model), _eager_grads(ref, batches, 1.0)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="buckets must be positive lengths"):
        GraphedStep(model, capture=EagerCapture(), buckets=[0, 8])


def test_shapes_past_max_graphs_run_eagerly_with_one_warning():
    model, ref = _pair()
    batches = [_batches(1, shape=(1, n), seed=n)[0] for n in (4, 5, 6, 6)]
    step = GraphedStep(model, capture=EagerCapture(), pad_to=1, max_graphs=2)
    with pytest.warns(UserWarning, match="max_graphs"):
        for b in batches:
            step(**b)
    assert len(step.graphs) == 2 and step.eager_calls == 2 and step.replays == 2
    for g, e in zip(_grads(model), _eager_grads(ref, batches, 1.0)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_a_replay_adds_its_gradients_in_one_foreach_add_not_one_add_per_parameter():
    """The backward assigns each parameter's gradient and one `_foreach_add_` adds them all into the buffers
    (autograd would launch an `add_` per parameter); the sums are eager's, bit for bit."""
    model, ref = _pair()
    batches = _batches(3)
    step = GraphedStep(model, capture=EagerCapture(), pad_to=1)
    step(**batches[0])
    step(**batches[1])  # captured: replays from here
    with _OpCounter() as counter:
        step(**batches[2])
    assert counter.ops.count("aten._foreach_add_") == 1 and "aten.add_" not in counter.ops, counter.ops
    for g, e in zip(_grads(model), _eager_grads(ref, batches, 1.0)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_a_failed_backward_leaves_the_accumulated_gradients_as_they_were():
    """The gradients are off the parameters while the backward runs: one that raises (the op's NaN check, an
    interrupt) puts the accumulated ones back, unchanged, and the next micro-steps accumulate on them."""
    model, ref = _pair()
    batches = _batches(3)
    step = GraphedStep(model, capture=EagerCapture(), pad_to=1)
    step(**batches[0])
    before = _grads(model)

    def fail(grad):
        raise FloatingPointError("non-finite gradient")

    handle = model.a.register_hook(fail)
    with pytest.raises(FloatingPointError):
        step(**batches[1])
    handle.remove()
    for g, b in zip(_grads(model), before):
        torch.testing.assert_close(g, b, rtol=0, atol=0)
    step(**batches[2])
    for g, e in zip(_grads(model), _eager_grads(ref, [batches[0], batches[2]], 1.0)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_post_accumulate_hooks_see_the_accumulated_gradient():
    """A post-accumulate-grad hook (grad_sync's overlapped reduction) must see the sum so far: with one
    registered, autograd accumulates as before."""
    model, ref = _pair()
    seen = []
    model.a.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    batches = _batches(3)
    step = GraphedStep(model, capture=EagerCapture(), pad_to=1)
    for b in batches:
        step(**b)
    expected = _eager_grads(ref, batches, 1.0)
    torch.testing.assert_close(seen[-1], expected[0], rtol=0, atol=0)
    for g, e in zip(_grads(model), expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_a_replaced_grad_is_refused():
    model, _ = _pair()
    step = GraphedStep(model, capture=EagerCapture(), pad_to=1)
    step(**_batches(1)[0])
    model.a.grad = torch.zeros_like(model.a)
    with pytest.raises(RuntimeError, match="replaced by another tensor"):
        step(**_batches(1)[0])


def test_bad_use_gets_clear_errors():
    model, _ = _pair()
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedStep(model)  # CPU parameters and no capture backend given
    with pytest.raises(ValueError, match="no trainable parameters"):
        GraphedStep(nn.Linear(2, 2).requires_grad_(False), capture=EagerCapture(), pad_to=1)
    step = GraphedStep(model, capture=EagerCapture(), pad_to=1)
    with pytest.raises(ValueError, match="labels="):
        step(input_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(model, warmup=0, capture=EagerCapture(), pad_to=1)


class FailingCapture(EagerCapture):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_warns_once_and_trains_on_eagerly_with_the_same_gradients():
    model, ref = _pair()
    batches = _batches(3)
    step = GraphedStep(model, capture=FailingCapture(), pad_to=1)
    with pytest.warns(UserWarning, match="cuda_graphs: false") as caught:
        losses = [step(**b).clone() for b in batches]
    assert len([w for w in caught if "GraphedStep" in str(w.message)]) == 1
    assert step.failure is not None and not step.graphs and step.eager_calls == 3
    for g, e in zip(_grads(model), _eager_grads(ref, batches, 1.0)):  # the warm-up left no trace
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    torch.testing.assert_close(losses[0], ref(**batches[0]).loss.detach())


def test_strict_capture_failure_raises_and_micro_step_reports_the_fallback():
    model, ref = _pair()
    batch = _batches(1)[0]
    with pytest.raises(RuntimeError, match="cuda_graphs: false"):
        GraphedStep(model, capture=FailingCapture(), strict=True)(**batch)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # warm-up left no trace

    lines = []
    micro = MicroStep(model, TrainConfig(cuda_graphs="false"), torch.device("cpu"), lines.append)
    micro.graphed, micro.mode = GraphedStep(model, capture=FailingCapture(), pad_to=1), "auto"
    with pytest.warns(UserWarning):
        loss = micro(batch)
    assert any("without CUDA graphs" in line for line in lines)
    torch.testing.assert_close(loss, ref(**batch).loss.detach())


def test_micro_step_modes_on_cpu():
    model, _ = _pair()
    assert MicroStep(model, TrainConfig(cuda_graphs="auto"), torch.device("cpu")).graphed is None
    with pytest.raises(ValueError, match="needs a CUDA device"):
        MicroStep(model, TrainConfig(cuda_graphs="true"), torch.device("cpu"))


def test_graphed_step_drives_a_surogate_compiled_model():
    """The compiled LoRA model (regional Dynamo graphs, custom ops) through the replay path."""
    import transformers as T

    import surogate

    torch.manual_seed(0)
    cfg = T.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=96)
    base = T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    torch.manual_seed(2)  # the same LoRA initialisation for both
    ref = surogate.compile(copy.deepcopy(base), recipe="bf16", arch="cpu")
    torch.manual_seed(2)
    model = surogate.compile(base, recipe="bf16", arch="cpu")
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": (ids := torch.randint(0, 96, (2, 16), generator=g)), "labels": ids} for _ in range(2)]
    step = GraphedStep(model, loss_scale=0.5, capture=EagerCapture(), pad_to=1)
    for b in batches:
        step(**b)
    for b in batches:
        (ref(**b).loss * 0.5).backward()
    named = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, named[n].grad, rtol=0, atol=0)


def test_the_warm_up_builds_the_mask_the_capture_will(monkeypatch):
    """StableLM builds its attention mask with transformers' helpers, which decide otherwise while a CUDA stream
    captures (`is_tracing`): rows of one example each got no mask eagerly and a dense one under capture, so the
    compiled layers compiled again inside the capture, which failed (H200 run 157: the trainer fell back to
    eager). GraphedStep's warm-up runs under `compat.masks_as_under_capture`: it builds the capture's mask."""
    import transformers as T
    from test_compile_models import tiny_config

    from surogate.compat import masks_as_under_capture

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config("stablelm"), attn_implementation="sdpa")
    seen = []
    model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    ids = torch.randint(1, 100, (2, 24))
    batch = {"input_ids": ids, "position_ids": torch.arange(24).expand(2, 24), "use_cache": False}
    with torch.no_grad():
        model(**batch)  # eagerly
        with monkeypatch.context() as patch:
            patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
            model(**batch)  # as a CUDA graph records it
        with masks_as_under_capture():
            model(**batch)  # the warm-up
        model(**batch)  # eagerly again: the helpers are as they were
    eager, captured, warm_up, after = seen
    assert eager is None and after is None and captured is not None  # what failed the capture
    assert warm_up is not None and torch.equal(warm_up, captured)


def test_eager_attention_masks_are_built_without_a_copy_from_the_host(monkeypatch):
    """GPT-Neo (eager attention only) failed its capture on transformers 5.17 (H100, session 37): `eager_mask` made
    its 0 with `torch.tensor(0.0, device=...)`, a host copy a capture refuses. Inside `capturable_eager_masks`
    (GraphedStep's warm-up and capture) the eager mask is filled on the device: the same masks (plain, padded,
    packed rows), no tensor made from host data while the model builds them; a builder written the 5.17 way is
    swapped for the capture and back after."""
    import transformers as T
    from transformers import masking_utils
    from test_compile_models import tiny_config

    from surogate.compat import capturable_eager_masks

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config("gpt_neo"))
    seen = []
    model.transformer.h[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    ids = torch.randint(1, 100, (2, 12))
    padded = torch.ones(2, 12, dtype=torch.long)
    padded[1, 9:] = 0
    batches = [{"input_ids": ids}, {"input_ids": ids, "attention_mask": padded},
               {"input_ids": ids, "position_ids": torch.tensor([list(range(5)) + list(range(7))] * 2)}]
    made = []
    tensor = torch.tensor
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
            with capturable_eager_masks(), monkeypatch.context() as patch:
                patch.setattr(torch, "tensor", lambda *a, **k: made.append(sys._getframe(1).f_globals["__name__"])
                              or tensor(*a, **k))
                model(**batch, use_cache=False)
    # nothing copied from the host by the mask builders (GPT-Neo's attention makes its own, inside the compiled
    # layers on the GPU: a constant there)
    assert made and "transformers.masking_utils" not in made
    for eager, captured in zip(seen[::2], seen[1::2]):
        assert captured is not None and torch.equal(eager, captured)

    def eager_mask_as_in_5_17(*args, dtype=torch.float32, **kwargs):
        kwargs.pop("allow_is_causal_skip", None)
        mask = masking_utils.sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)
        return torch.where(mask, torch.tensor(0.0, device=mask.device, dtype=dtype), torch.finfo(dtype).min)

    monkeypatch.setitem(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "eager", eager_mask_as_in_5_17)
    with torch.no_grad():
        model(**batches[1], use_cache=False)
        with capturable_eager_masks():
            assert masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["eager"] is not eager_mask_as_in_5_17
            model(**batches[1], use_cache=False)
    assert masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["eager"] is eager_mask_as_in_5_17
    assert torch.equal(seen[-2], seen[-1])
