"""`surogate.compile(checkpoint="offload")` on the CPU: the offload's bookkeeping with a CPU "host" buffer.

The host buffers, the order of copies out and back, the buffer reuse and the retire rule are the same
code on every device; only the CUDA side stream and events are skipped here (tests/gpu/test_offload_gpu.py
runs those). Offloading moves bytes, never changes them: the loss and every LoRA gradient equal those of
`checkpoint=True` and of no checkpointing bit for bit, with LoRA dropout (the recompute replays the RNG).
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as T
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import surogate
from surogate.compiler import _draws_random
from surogate.offload import IN_FLIGHT, BlockInputOffload, size_class
from surogate.training.graphed_step import EagerCapture, GraphedStep

V = 128
LAYERS = 4
# init_lora_weights=False: B is not zero, so every lora_A gets a nonzero gradient to compare. LoRA dropout:
# the recompute must draw the forward's masks again.
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "init_lora_weights": False}


def _model(arch: str, layers: int = LAYERS) -> nn.Module:
    torch.manual_seed(0)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": V}
    config = T.Qwen3Config(**shape) if arch == "qwen3" else T.LlamaConfig(**shape)
    return T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)


def _compiled(arch: str, checkpoint, regional: bool = True, fraction: float = 1.0, layers: int = LAYERS) -> nn.Module:
    return surogate.compile(_model(arch, layers), arch="cpu", lora=LORA, regional=regional, checkpoint=checkpoint,
                            checkpoint_fraction=fraction).train()


def _ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(seed))


def _layers(model) -> nn.ModuleList:
    return model.base_model.model.model.layers


def _step(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks in every run
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def _assert_equal(a, b, layers: int = LAYERS) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * layers  # A and B of 7 linears a layer
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, name
        assert torch.equal(grads_a[name], grads_b[name]), name


def _forward_watching_inputs(model, ids: torch.Tensor):
    """The loss (graph alive), and per block its input's value and a weak reference to its storage."""
    seen: list[tuple[torch.Tensor, StorageWeakRef]] = []

    def record(module, args, kwargs):
        seen.append((args[0].detach().clone(), StorageWeakRef(args[0].untyped_storage())))

    hooks = [b.register_forward_pre_hook(record, with_kwargs=True) for b in _layers(model)]
    try:
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
    finally:
        for h in hooks:
            h.remove()
    return loss, seen


def _buffer_pointers(offload: BlockInputOffload) -> dict[tuple, list[int]]:
    return {key: [b.data.data_ptr() for b in pool] for key, pool in offload.buffers.items()}


def test_checkpoint_value_is_checked():
    for wrong in ("offlaod", "true", 1, None):
        with pytest.raises(ValueError, match=r"^checkpoint takes False, True .* or 'offload'.*, got"):
            surogate.compile(_model("qwen3"), arch="cpu", checkpoint=wrong)


@functools.cache
def _references(arch: str, layers: int = LAYERS):
    """No checkpointing's and checkpoint=True's step on `_ids(32)`, and the checkpoint=True model (compiled once)."""
    ids = _ids(32)
    plain = _step(_compiled(arch, False, layers=layers), ids)
    ckpt_model = _compiled(arch, True, layers=layers)
    return plain, _step(ckpt_model, ids), ckpt_model


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_offload_same_numbers_inputs_on_host_buffers_reused(arch):
    ids = _ids(32)
    plain, ckpt, ckpt_model = _references(arch)
    torch._dynamo.utils.counters.clear()
    model = _compiled(arch, "offload")
    offload = model.surogate_offload
    assert any("checkpoint='offload'" in n for n in model.surogate_report.notes)
    assert not hasattr(ckpt_model, "surogate_offload")
    assert _draws_random(_layers(model)[0])  # LoRA dropout: the equalities below need the RNG replayed

    # After the forward: every block input but the newest IN_FLIGHT is gone from the compute device and its
    # value sits in the block's host buffer. (checkpoint=True, the control, keeps every one alive.) Block 0's
    # input too: the copy of the embedding output that surogate.input_grad makes require grad is no leaf, which
    # autograd would hold anyway.
    loss, seen = _forward_watching_inputs(model, ids)
    assert len(seen) == LAYERS and sorted(key[0] for key in offload.buffers) == list(range(LAYERS))
    for block, (value, ref) in enumerate(seen):
        (pool,) = [pool for key, pool in offload.buffers.items() if key[0] == block]
        assert len(pool) == 1 and torch.equal(pool[0].view(value.shape), value), block
        assert ref.expired() == (block < LAYERS - IN_FLIGHT), block
    held = offload.held_on_device()
    assert len(held) == IN_FLIGHT
    assert all(torch.equal(t, seen[LAYERS - IN_FLIGHT + i][0]) for i, t in enumerate(held))
    loss.backward()
    assert offload.held_on_device() == []
    ckpt_loss, ckpt_seen = _forward_watching_inputs(ckpt_model, ids)
    assert not any(ref.expired() for _, ref in ckpt_seen)
    del ckpt_loss

    # The same bits as checkpoint=True and as no checkpointing (LoRA dropout on: the RNG was replayed),
    # and the next steps reuse the same host buffers.
    pointers = _buffer_pointers(offload)
    assert len(pointers) == LAYERS and all(len(p) == 1 for p in pointers.values())
    offloaded = _step(model, ids)
    _assert_equal(offloaded, plain)
    _assert_equal(offloaded, ckpt)
    _step(model, _ids(32, seed=2))
    assert _buffer_pointers(offload) == pointers
    # The recompute reads the input back from the buffer: the same guards, no second graph.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert offload.host_bytes() == LAYERS * 2 * 32 * 64 * 2  # batch x seq x hidden in bf16 each, no more


def test_offload_whole_backbone_same_numbers():
    model = _compiled("qwen3", "offload", regional=False)
    # The same bits as regional compilation without checkpointing: the blocks compile to the same graph.
    _assert_equal(_step(model, _ids(32)), _references("qwen3")[0])
    # The blocks run their own shared graph (a graph break each in the backbone), and offload the same way.
    assert len(model.surogate_report.rewritten) == 7
    assert len(model.surogate_offload.buffers) == LAYERS
    assert model.surogate_offload.held_on_device() == []


PARTIAL_LAYERS, FRACTION, CHECKPOINTED = 8, 0.75, 6  # blocks 0-5 checkpointed, 6 and 7 keep their activations


@pytest.mark.parametrize("regional", [True, False])
def test_partial_offload_moves_only_the_checkpointed_inputs(regional):
    ids = _ids(32)
    plain, ckpt, _ = _references("qwen3", PARTIAL_LAYERS)
    model = _compiled("qwen3", "offload", regional=regional, fraction=FRACTION, layers=PARTIAL_LAYERS)
    offload = model.surogate_offload
    # Host buffers for the checkpointed blocks; of those, the inputs but the newest IN_FLIGHT leave the device
    # during the forward. The un-checkpointed blocks' inputs stay: their graphs keep them.
    loss, seen = _forward_watching_inputs(model, ids)
    assert sorted(key[0] for key in offload.buffers) == list(range(CHECKPOINTED))
    for block, (value, ref) in enumerate(seen[:CHECKPOINTED]):
        (pool,) = [pool for key, pool in offload.buffers.items() if key[0] == block]
        assert torch.equal(pool[0].view(value.shape), value), block
    if regional:  # with regional=False Dynamo traces the watching hook, and under pytest keeps its frame alive
        assert [ref.expired() for _, ref in seen] == [block in range(CHECKPOINTED - IN_FLIGHT)
                                                      for block in range(PARTIAL_LAYERS)]
    assert len(offload.held_on_device()) == IN_FLIGHT
    loss.backward()
    assert offload.held_on_device() == []
    assert any("first 6 of the 8 decoder blocks" in n for n in model.surogate_report.notes)
    # The same bits as checkpoint=True and as no checkpointing.
    offloaded = _step(model, ids)
    _assert_equal(offloaded, plain, PARTIAL_LAYERS)
    _assert_equal(offloaded, ckpt, PARTIAL_LAYERS)
    assert offload.host_bytes() == CHECKPOINTED * 2 * 32 * 64 * 2


def test_offload_under_graphed_step_and_shape_buckets():
    """GraphedStep's warm-up allocates the buffers and every replay reuses them; a shorter bucket fits in
    them, a longer one gets buffers of its own."""
    model = _compiled("qwen3", "offload")
    offload = model.surogate_offload
    step = GraphedStep(model, capture=EagerCapture(), pad_to=16)
    ids = _ids(32)
    step(input_ids=ids, labels=ids)
    pointers = _buffer_pointers(offload)
    for seed in (2, 3):
        ids = _ids(32, seed)
        step(input_ids=ids, labels=ids)
    assert step.replays == 3 and _buffer_pointers(offload) == pointers
    short = _ids(9)  # bucket 16: fits in the 32-token buffers
    step(input_ids=short, labels=short)
    assert _buffer_pointers(offload) == pointers
    long = _ids(40)  # bucket 48: a buffer more per block, the 32-token ones kept for their graph
    step(input_ids=long, labels=long)
    grown = _buffer_pointers(offload)
    assert all(len(grown[key]) == 2 and grown[key][0] == pointers[key][0] for key in pointers)


# --- the offload alone, on toy blocks ---------------------------------------------------------------------

N_TOY = IN_FLIGHT + 3  # blocks 1 .. N_TOY - IN_FLIGHT - 1 leave the device (block 0's input is a leaf)


def _toy_blocks(offload: BlockInputOffload):
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8) for _ in range(N_TOY)]

    def run(x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(layers):
            def block(h, _layer=layer):
                return h + torch.tanh(_layer(h))

            with offload.hooks(i):
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return x.square().sum()

    return layers, run


def _grads(layers) -> list[torch.Tensor]:
    grads = [p.grad.clone() for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    return grads


def _inputs(n: int) -> list[torch.Tensor]:
    return [torch.randn(4, 8, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(n)]


def test_two_forwards_before_their_backwards_take_other_buffers():
    offload = BlockInputOffload()
    layers, run = _toy_blocks(offload)
    x1, x2 = _inputs(2)
    run(x1).backward()
    want1 = _grads(layers)
    run(x2).backward()
    want2 = _grads(layers)
    loss1, loss2 = run(x1), run(x2)
    assert sorted(key[0] for key in offload.buffers) == list(range(1, N_TOY))
    assert all(len(pool) == 2 for pool in offload.buffers.values())  # the first forward's are still busy
    loss2.backward()
    got2 = _grads(layers)
    loss1.backward()
    got1 = _grads(layers)
    assert all(torch.equal(a, b) for a, b in zip(got1 + got2, want1 + want2))


def test_a_second_backward_reads_the_inputs_back_again():
    offload = BlockInputOffload()
    layers, run = _toy_blocks(offload)
    (x,) = _inputs(1)
    run(x).backward()
    once = _grads(layers)
    loss = run(x)
    loss.backward(retain_graph=True)
    loss.backward()  # every block recomputed again, its input copied back from its buffer once more
    assert all(torch.equal(a, 2 * b) for a, b in zip(_grads(layers), once))


def test_reading_back_after_a_later_forward_reused_the_buffer_raises():
    offload = BlockInputOffload()
    layers, run = _toy_blocks(offload)
    x, y = _inputs(2)
    loss = run(x)
    loss.backward(retain_graph=True)  # unpacked: its buffers are free again
    run(y)  # takes them
    with pytest.raises(RuntimeError, match="reused its host buffer"):
        loss.backward()


def test_size_classes_are_powers_of_two():
    assert [size_class(n) for n in (1, 2, 3, 8, 9, 2 * 2048 * 4096, 2 * 2047 * 4096)] == \
        [1, 2, 4, 8, 16, 2 * 2048 * 4096, 2 * 2048 * 4096]
