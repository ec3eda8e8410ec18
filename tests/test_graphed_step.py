"""GraphedStep's bookkeeping on CPU: `EagerCapture` stands in for the CUDA graph (it runs the recorded
micro-step at each replay), so warm-up, gradient binding, shape fallback and capture failure are
checked against a plain eager loop. tests/gpu/test_graphed_step_gpu.py replays real CUDA graphs."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

from surogate.config import TrainConfig
from surogate.graphed_step import EagerCapture, GraphedStep
from surogate.train import MicroStep


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
    step = GraphedStep(model, loss_scale=1 / 3, warmup=2, capture=EagerCapture())
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
    step = GraphedStep(model, loss_scale=0.5, capture=EagerCapture())
    step(**batches[1])
    for g, e in zip(_grads(model), _eager_grads(ref, batches, 0.5)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_optimizer_steps_with_zero_grad_match_eager(set_to_none):
    model, ref = _pair()
    step = GraphedStep(model, loss_scale=0.5, capture=EagerCapture())
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


def test_other_shapes_run_eagerly_with_a_warning_and_the_same_gradients():
    model, ref = _pair()
    first, odd = _batches(1)[0], _batches(1, shape=(1, 5), seed=3)[0]
    step = GraphedStep(model, capture=EagerCapture())
    step(**first)
    with pytest.warns(UserWarning, match="running them eagerly"):
        step(**odd)
    assert step.eager_calls == 1 and step.replays == 1
    for g, e in zip(_grads(model), _eager_grads(ref, [first, odd], 1.0)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_a_replaced_grad_is_refused():
    model, _ = _pair()
    step = GraphedStep(model, capture=EagerCapture())
    step(**_batches(1)[0])
    model.a.grad = torch.zeros_like(model.a)
    with pytest.raises(RuntimeError, match="replaced by another tensor"):
        step(**_batches(1)[0])


def test_bad_use_gets_clear_errors():
    model, _ = _pair()
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedStep(model)  # CPU parameters and no capture backend given
    with pytest.raises(ValueError, match="no trainable parameters"):
        GraphedStep(nn.Linear(2, 2).requires_grad_(False), capture=EagerCapture())
    step = GraphedStep(model, capture=EagerCapture())
    with pytest.raises(ValueError, match="labels="):
        step(input_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(model, warmup=0, capture=EagerCapture())


class FailingCapture(EagerCapture):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_says_what_to_do_and_micro_step_falls_back():
    model, ref = _pair()
    batch = _batches(1)[0]
    with pytest.raises(RuntimeError, match="cuda_graphs: false"):
        GraphedStep(model, capture=FailingCapture())(**batch)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # warm-up left no trace

    lines = []
    micro = MicroStep(model, TrainConfig(cuda_graphs="false"), torch.device("cpu"), lines.append)
    micro.graphed, micro.mode = GraphedStep(model, capture=FailingCapture()), "auto"
    loss = micro(batch)
    assert micro.graphed is None and any("without CUDA graphs" in line for line in lines)
    torch.testing.assert_close(loss, ref(**batch).loss.detach())
    for g, e in zip(_grads(model), _eager_grads(ref, [batch], 1.0)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


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
    step = GraphedStep(model, loss_scale=0.5, capture=EagerCapture())
    for b in batches:
        step(**b)
    for b in batches:
        (ref(**b).loss * 0.5).backward()
    named = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, named[n].grad, rtol=0, atol=0)


def test_the_chunked_loss_path_passes_a_causal_mask_mapping_where_the_model_takes_one():
    """Without it transformers inspects position_ids for packing (a host sync eagerly; a dense mask
    under capture), so a captured step would differ from its warm-up."""
    import transformers as T

    from surogate.compiler import _causal_mask_mapping

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=64)
    qwen3 = T.AutoModelForCausalLM.from_config(T.Qwen3Config(head_dim=16, **small))
    assert _causal_mask_mapping(qwen3.model, qwen3.config) == {"full_attention": None}
    llama = T.AutoModelForCausalLM.from_config(T.LlamaConfig(**small))
    assert _causal_mask_mapping(llama.model, llama.config) is None  # its forward takes no mapping
    sliding = T.Qwen3Config(head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=0,
                            **small)
    windowed = T.AutoModelForCausalLM.from_config(sliding)
    assert _causal_mask_mapping(windowed.model, windowed.config) is None  # sliding layers need their mask
