"""`surogate.compile(checkpoint=True)`: same numbers, less kept for the backward, no extra compilation.

Checkpointing only changes when the block forward runs (once more, in the backward), not what it
computes: on CPU (aot_eager) the loss and every LoRA gradient equal the uncheckpointed model's bit
for bit. Memory is measured as the bytes of the distinct storages kept for the backward, weights
excluded: what autograd saves (`saved_tensors_hooks`, counted during the forward), plus, with
regional compilation, each block's tensor inputs: the eager checkpoint around a block keeps them
to replay it, and its own hooks hide what it saves inside from ours. (With whole-backbone capture
the checkpoint regions are inside the compiled graph, which saves their inputs itself, where our
hooks see them; a module hook there would be traced into the graph and break it.)
"""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers as T
from torch import nn

import surogate

V = 128


def _qwen3(layers: int = 2):
    torch.manual_seed(0)
    cfg = T.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=V)
    return T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)


def _compiled(checkpoint: bool, regional: bool = True, fraction: float = 1.0, layers: int = 2):
    # init_lora_weights=False: B is not zero, so every lora_A gets a nonzero gradient to compare. LoRA
    # dropout: the replay must draw the forward's masks again (checkpoint restores the RNG state).
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "init_lora_weights": False}
    return surogate.compile(_qwen3(layers), arch="cpu", lora=lora, regional=regional, checkpoint=checkpoint,
                            checkpoint_fraction=fraction).train()


def _ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(seed))


def _layers(model) -> nn.ModuleList:
    return model.base_model.model.model.layers


def _loss_and_kept_bytes(model, ids: torch.Tensor, regional: bool) -> tuple[torch.Tensor, int]:
    """The loss, and the bytes of distinct non-weight storages kept alive for the backward."""
    weights = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    kept: dict[int, tuple[int, torch.Tensor]] = {}  # data_ptr -> (nbytes, a tensor holding the storage alive)

    def keep(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t)

    def pack(t):
        keep(t)
        return t

    def block_inputs(module, args, kwargs):
        for value in (*args, *kwargs.values()):
            for t in value if isinstance(value, (tuple, list)) else (value,):
                keep(t)

    hooks = [b.register_forward_pre_hook(block_inputs, with_kwargs=True) for b in _layers(model) if regional]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
    finally:
        for h in hooks:
            h.remove()
    return loss, sum(n for n, _ in kept.values())


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def _run(checkpoint: bool, regional: bool = True, fraction: float = 1.0, layers: int = 2):
    """Compile from scratch, one forward (measured) and backward; the Dynamo counters of that alone."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = _compiled(checkpoint, regional, fraction, layers)
    torch.manual_seed(5)  # the same dropout masks in both runs
    loss, kept = _loss_and_kept_bytes(model, _ids(32), regional)
    loss.backward()
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    return model, loss.detach(), kept, frames


def _assert_same_numbers(plain, ckpt, loss_plain, loss_ckpt, layers: int = 2):
    assert torch.equal(loss_ckpt, loss_plain)
    g_plain, g_ckpt = _lora_grads(plain), _lora_grads(ckpt)
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) == 2 * 7 * layers  # A and B of 7 linears a layer
    for name in g_plain:
        assert g_ckpt[name] is not None and g_ckpt[name].abs().sum() > 0, name
        assert torch.equal(g_ckpt[name], g_plain[name]), name


def test_checkpoint_must_be_a_bool_or_offload():
    with pytest.raises(ValueError, match=r"checkpoint takes False, True .* or 'offload'"):
        surogate.compile(_qwen3(), arch="cpu", checkpoint="yes")


def test_checkpoint_refuses_models_it_cannot_checkpoint():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = T.PretrainedConfig()
            self.proj = nn.Linear(8, 8)

    with pytest.raises(ValueError, match="no ModuleList of blocks holding linears"):
        surogate.compile(NoBlocks(), arch="cpu", checkpoint=True)
    model = _qwen3()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="_checkpointing_disable"):
        surogate.compile(model, arch="cpu", checkpoint=True)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_hugging_face_checkpointing_is_refused_without_checkpoint_too(use_reentrant):
    """With transformers' checkpointing on, Dynamo captured no graph and every LoRA linear ran eagerly, with no
    word (the report said "pending" after training): refused in one line, the model left as it came."""
    model = _qwen3()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"_checkpointing_disable\(\) first and pass checkpoint=True"):
        surogate.compile(model, arch="cpu")
    assert {n: type(m) for n, m in model.named_modules()} == before
    model.gradient_checkpointing_disable()
    compiled = surogate.compile(model, arch="cpu", checkpoint=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert len(compiled.surogate_report.rewritten) == 7


def test_regional_checkpoint_same_numbers_less_kept_no_extra_compile():
    plain, loss_plain, kept_plain, frames_plain = _run(checkpoint=False)
    ckpt, loss_ckpt, kept_ckpt, frames_ckpt = _run(checkpoint=True)
    _assert_same_numbers(plain, ckpt, loss_plain, loss_ckpt)
    # Measured 44,296 / 482,568 = 0.092 (2 layers, batch 2 x 32): what is left is the blocks' inputs
    # (hidden states, RoPE cos/sin), the final norm's and the chunked loss's, which no checkpoint covers.
    assert kept_ckpt < 0.2 * kept_plain, (kept_ckpt, kept_plain)
    assert frames_ckpt == frames_plain == 1  # the replay in the backward reuses the compiled block graph
    assert ckpt.surogate_report.graphs == plain.surogate_report.graphs == 1
    assert len(ckpt.surogate_report.rewritten) == 7
    assert any("activation checkpointing on" in n for n in ckpt.surogate_report.notes)
    assert not any("checkpointing" in n for n in plain.surogate_report.notes)


def test_checkpoint_one_graph_for_every_length_and_trains():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = _compiled(checkpoint=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids = _ids(24)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile (per length, per layer) raises
        for length in (9, 17):  # forward and backward (the replay) at other lengths
            batch = _ids(length, seed=length)
            model(input_ids=batch, labels=batch).loss.backward()
        opt.zero_grad()
        torch.manual_seed(0)  # the dropout masks of the 6 forwards
        losses = []
        for _ in range(6):  # 5 steps, then the loss they lead to
            loss = model(input_ids=ids, labels=ids).loss
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    # Measured 4.871 -> 4.671 (near ln 128: random init, only the r=8 adapters train, LoRA dropout 0.1).
    assert losses[-1] < losses[0] - 0.1, losses


def test_whole_backbone_checkpoint():
    plain, loss_plain, kept_plain, frames_plain = _run(checkpoint=False, regional=False)
    ckpt, loss_ckpt, kept_ckpt, frames_ckpt = _run(checkpoint=True, regional=False)
    _assert_same_numbers(plain, ckpt, loss_plain, loss_ckpt)
    # The passes rewrite inside each block's checkpoint region: 7 LoRA linears in each of the 2 layers.
    assert len(ckpt.surogate_report.rewritten) == 14
    assert frames_ckpt == frames_plain == 1 and ckpt.surogate_report.graphs == 1
    # Measured 112,648 / 473,864 = 0.24: AOTAutograd's partitioner keeps each region's inputs and recomputes the
    # rest, except random ops: it keeps the LoRA dropout masks (1 byte an element; 0.090 without dropout).
    assert kept_ckpt < 0.4 * kept_plain, (kept_ckpt, kept_plain)


def test_the_rng_state_is_saved_only_for_blocks_that_draw_random_numbers():
    """A dropout-free block skips the RNG save/restore (a per-block cost, refused under CUDA-graph capture)."""
    from torch import nn

    from surogate.compiler import _draws_random

    block = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0))
    assert not _draws_random(block)
    assert _draws_random(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)))
    attention = nn.Module()
    attention.attention_dropout = 0.1
    assert _draws_random(nn.Sequential(attention))


# --- checkpoint_fraction: the first blocks checkpointed, the rest keep their activations ----------------

PARTIAL_LAYERS = 3  # checkpoint_fraction=2/3: blocks 0 and 1 checkpointed, block 2 not


def _saves_per_block(model, ids: torch.Tensor) -> list[int]:
    """How many tensors each block saves where an outer `saved_tensors_hooks` sees them (regional compilation):
    a checkpointed block's own hooks take what its block saves, so fewer there."""
    saves = [0] * len(_layers(model))
    running: list[int] = []

    def pack(t):
        if running:
            saves[running[-1]] += 1
        return t

    def enter(index):
        return lambda module, args: running.append(index)

    def leave(module, args, output):
        running.pop()

    hooks = []
    for index, block in enumerate(_layers(model)):
        hooks += [block.register_forward_pre_hook(enter(index)), block.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return saves


def test_checkpoint_fraction_is_checked():
    for wrong in (0, 0.0, -0.5, 1.5, float("nan"), True, "0.5", None):
        with pytest.raises(ValueError, match=r"^checkpoint_fraction takes a number in \(0, 1\] .*, got"):
            surogate.compile(_qwen3(), arch="cpu", checkpoint=True, checkpoint_fraction=wrong)
    with pytest.raises(ValueError, match=r"^checkpoint_fraction=0.5 needs checkpoint=True or 'offload'"):
        surogate.compile(_qwen3(), arch="cpu", checkpoint_fraction=0.5)
    model = _qwen3()
    with pytest.raises(ValueError, match="checkpoint_fraction"):
        surogate.compile(model, arch="cpu", checkpoint="offload", checkpoint_fraction=2)
    assert not hasattr(model, "peft_config")  # refused before anything changed the model


def test_checkpointed_blocks_round_to_the_nearest_block_at_least_one():
    from surogate.compiler import checkpointed_blocks

    assert [checkpointed_blocks(36, f) for f in (2 / 3, 0.67, 0.75, 0.5, 0.99, 1.0, 0.001)] == \
        [24, 24, 27, 18, 36, 36, 1]
    assert [checkpointed_blocks(3, f) for f in (0.5, 2 / 3, 0.1)] == [2, 2, 1]  # a half rounds up


def test_regional_partial_checkpoint_same_numbers_first_blocks_kept_between():
    plain, loss_plain, kept_plain, _ = _run(False, layers=PARTIAL_LAYERS)
    ckpt, loss_ckpt, kept_ckpt, _ = _run(True, layers=PARTIAL_LAYERS)
    part, loss_part, kept_part, frames_part = _run(True, fraction=2 / 3, layers=PARTIAL_LAYERS)
    _assert_same_numbers(plain, part, loss_plain, loss_part, PARTIAL_LAYERS)
    _assert_same_numbers(ckpt, part, loss_ckpt, loss_part, PARTIAL_LAYERS)
    # One block of three keeps its activations: exactly a third of the way from checkpoint=True to none (every
    # block saves the same tensors; the inputs are kept in every mode). Measured 52,488 < 226,568 < 574,728 bytes.
    assert kept_ckpt < kept_part < kept_plain, (kept_ckpt, kept_part, kept_plain)
    assert 3 * (kept_part - kept_ckpt) == kept_plain - kept_ckpt, (kept_ckpt, kept_part, kept_plain)
    # Blocks 0 and 1 save what a checkpointed block saves, block 2 what a plain one does (measured 1 and 61).
    (ckpt_saves, *_), (plain_saves, *_) = _saves_per_block(ckpt, _ids(32)), _saves_per_block(plain, _ids(32))
    assert ckpt_saves < plain_saves, (ckpt_saves, plain_saves)
    assert _saves_per_block(part, _ids(32)) == [ckpt_saves, ckpt_saves, plain_saves]
    assert frames_part == 1 and part.surogate_report.graphs == 1  # plain and checkpointed calls share the graph
    assert any("first 2 of the 3 decoder blocks" in n for n in part.surogate_report.notes)
    assert not any("first" in n for n in ckpt.surogate_report.notes if "checkpointing" in n)


def test_whole_backbone_partial_checkpoint(monkeypatch):
    """regional=False: Dynamo captures a checkpoint region for each of the first blocks only."""
    import surogate.compiler as compiler

    regions = []
    run_in_bodies = compiler._run_pipeline_in_checkpoint_bodies

    def count_regions(gm, ctx):
        regions.append(sum(n.target is torch.ops.higher_order.tag_activation_checkpoint for n in gm.graph.nodes))
        run_in_bodies(gm, ctx)

    monkeypatch.setattr(compiler, "_run_pipeline_in_checkpoint_bodies", count_regions)
    plain, loss_plain, kept_plain, _ = _run(False, regional=False, layers=PARTIAL_LAYERS)
    ckpt, loss_ckpt, kept_ckpt, _ = _run(True, regional=False, layers=PARTIAL_LAYERS)
    part, loss_part, kept_part, frames_part = _run(True, regional=False, fraction=2 / 3, layers=PARTIAL_LAYERS)
    assert regions == [0, 3, 2]
    _assert_same_numbers(plain, part, loss_plain, loss_part, PARTIAL_LAYERS)
    _assert_same_numbers(ckpt, part, loss_ckpt, loss_part, PARTIAL_LAYERS)
    # Measured 157,192 < 290,824 < 553,992 bytes: 0.337 of the way (the partitioner's choices differ a little
    # with and without regions).
    assert kept_ckpt < kept_part < kept_plain, (kept_ckpt, kept_part, kept_plain)
    assert 0.3 < (kept_part - kept_ckpt) / (kept_plain - kept_ckpt) < 0.37, (kept_ckpt, kept_part, kept_plain)
    assert len(part.surogate_report.rewritten) == 7 * PARTIAL_LAYERS  # inside the regions and out
    assert frames_part == 1


@pytest.mark.parametrize("name", ["past_key_values", "past_key_value", "cache", "layer_past"])
def test_a_block_given_a_kv_cache_runs_without_checkpointing(name):
    """A checkpoint would replay the block in the backward and update its KV cache a second time, so a call
    that passes one (under any of the names transformers has used: `cache` since 5.2x) runs the block plainly."""
    from surogate.compiler import _checkpointed

    calls = []

    def block(x, **kwargs):
        calls.append(kwargs.get(name))
        return x * x  # saves x, so a checkpoint recomputes the block in the backward

    x = torch.ones(3, requires_grad=True)
    _checkpointed(block)(x, **{name: object()}).sum().backward()
    assert len(calls) == 1  # no recompute in the backward
    calls.clear()
    _checkpointed(block)(x, **{name: None}).sum().backward()
    assert len(calls) == 2  # checkpointed: forward, then the recompute
