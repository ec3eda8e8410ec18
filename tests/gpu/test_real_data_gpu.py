"""Real-data shapes on CUDA: CUDA-graph capture on every dense architecture of the test matrix, packed
rows (FlexAttention document mask) equal to their examples alone, padded batches of many lengths
replayed per shape bucket, and a failed capture that leaves the process whole."""

from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
import transformers as T  # noqa: E402
from test_compile_models import tiny_config  # noqa: E402

import surogate  # noqa: E402
from surogate.compiler import _attach_lora  # noqa: E402
from surogate.training.graphed_step import GraphedStep  # noqa: E402

ARCHS = ["llama", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "gpt2", "opt", "gpt_neox", "falcon", "stablelm",
         "gpt_neo"]


# The CPU matrix's configs, widened: Inductor's CUDA codegen asserted on the hidden-64 ones (torch 2.11).
WIDE = {"hidden_size": 256, "intermediate_size": 512, "ffn_dim": 512, "word_embed_proj_dim": 256, "head_dim": 64,
        "query_pre_attn_scalar": 64, "max_position_embeddings": 512}


def gpu_config(name: str, **overrides):
    config = tiny_config(name)
    for key, value in WIDE.items():
        if hasattr(config, key) and getattr(config, key) is not None:
            try:
                setattr(config, key, value)
            except AttributeError:  # derived (Falcon's head_dim = hidden_size / heads)
                pass
    for key, value in overrides.items():  # the test's own: set even where the config holds None (a window)
        setattr(config, key, value)
    if name == "gpt2":
        config.n_positions = 512
    return config


def _pair(name: str, recipe: str = "bf16", **overrides):
    torch.manual_seed(0)
    config = gpu_config(name, **overrides)
    base = T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).cuda()
    peft_model = _attach_lora(base, {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    twin = copy.deepcopy(peft_model)
    return surogate.compile(peft_model, recipe=recipe), surogate.compile(twin, recipe=recipe)


def _packed_batch(g: torch.Generator, lengths=(30, 50, 20, 28)):
    row = torch.randint(1, 120, (1, sum(lengths)), device="cuda", generator=g)
    positions = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
    labels = row.clone()
    labels[0, torch.tensor([0, *lengths[:-1]], device="cuda").cumsum(0)] = -100
    return {"input_ids": row, "labels": labels, "position_ids": positions}


def _eager_step(model, batch, scale):
    loss = model(**batch).loss
    (loss * scale).backward()
    return loss.detach()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ARCHS)
def test_capture_on_every_dense_architecture(name):
    """The step is captured (strict: a failed capture raises) and follows the eager twin, with plain rows
    and, where the model packs, packed rows: through surogate attention, or through transformers' masks built
    from position_ids (Falcon from transformers 5.25; the H200's 5.17 refuses packing it). StableLM and
    GPT-Neo build their masks with transformers' helpers: plain rows got no mask in the warm-up (SDPA's causal
    skip) and a dense one under capture, a second graph compiled inside the capture, which failed (H200 run
    157); the warm-up now builds the capture's mask (compat.masks_as_under_capture)."""
    from surogate.ops.attention import packing_refusal

    model, twin = _pair(name)
    packable = packing_refusal(model.base_model.model) is None
    g = torch.Generator("cuda").manual_seed(1)
    plain = {"input_ids": (ids := torch.randint(1, 120, (2, 96), device="cuda", generator=g)), "labels": ids}
    batches = [plain] + ([_packed_batch(g)] if packable else [])
    step = GraphedStep(model, loss_scale=0.5, strict=True)
    losses = [step(**b).clone() for b in batches for _ in range(2)]
    expected = [_eager_step(twin, b, 0.5) for b in batches for _ in range(2)]
    assert step.failure is None and step.replays == len(losses) and len(step.graphs) == len(batches)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=2e-3, atol=0)
    lora = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            cos = F.cosine_similarity(p.grad.flatten().float(), lora[n].grad.flatten().float(), dim=0)
            assert cos > 0.999, (n, cos.item())


def _token_losses(model, **inputs) -> torch.Tensor:
    hf = model.base_model.model
    grabbed = {}
    hook = hf.base_model.register_forward_hook(lambda m, i, out: grabbed.__setitem__("h", out[0]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    logits = hf.get_output_embeddings()(grabbed["h"]).float()
    labels = inputs["labels"]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none",
                           ignore_index=-100).view(labels.shape[0], -1)


@pytest.mark.gpu
@pytest.mark.parametrize("name, overrides", [("qwen3", {}), ("gemma2", {}), ("gemma3", {}),
                                             ("phi3", {"sliding_window": 24}), ("stablelm", {})])
def test_packed_rows_on_cuda_equal_their_examples_alone(name, overrides):
    """FlexAttention's document mask; gemma2: soft-capped, its sliding layers (window 16, shorter than the row) on
    the dense path; gemma3 (window 16) and phi3 (24), no soft-capping: window and document mask in
    one BlockMask, the examples alone (30 and 50 tokens longer than the window) through the plain window mask;
    stablelm: transformers' own SDPA masks, built from position_ids."""
    model, _ = _pair(name, **overrides)
    lengths = (30, 50, 20, 28)
    batch = _packed_batch(torch.Generator("cuda").manual_seed(2), lengths)
    packed = _token_losses(model, **batch)[0]
    pieces, start = [], 0
    for n in lengths:
        ids = batch["input_ids"][:, start:start + n]
        pieces.append(torch.cat([torch.zeros(1, device="cuda"), _token_losses(model, input_ids=ids, labels=ids)[0]]))
        start += n
    alone = torch.cat(pieces)[1:]
    keep = batch["labels"][0, 1:] != -100
    crossing = _token_losses(model, input_ids=batch["input_ids"], labels=batch["labels"])[0]
    assert (packed[keep] - alone[keep]).abs().max() < 0.03
    assert (crossing[keep] - alone[keep]).abs().max() > 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_rows_longer_than_the_window_through_flex_follow_the_dense_path(monkeypatch, packed):
    """Rows longer than Phi-3's sliding window (every layer windowed, head dim 96) take FlexAttention on CUDA
    (surogate/ops/attention.py masks_into): plain rows the window mask, packed rows (an example of 130 tokens, one
    of 30) the document mask and one of window and document; SUROGATE_ATTENTION=dense gives the dense-mask path,
    the reference."""
    from surogate.ops import attention

    model, twin = _pair("phi3", hidden_size=384, sliding_window=100)
    windows = []  # the windows of the BlockMasks built (eagerly, in the model's forward)
    build = attention.block_mask
    monkeypatch.setattr(attention, "block_mask", lambda *args: windows.append(args[2]) or build(*args))
    ids = torch.randint(1, 120, (2, 160), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    batch = {"input_ids": ids, "labels": ids}
    if packed:
        batch["position_ids"] = torch.cat([torch.arange(130), torch.arange(30)]).cuda()[None].expand(2, -1)
    flex_loss = model(**batch).loss
    flex_loss.backward()
    assert windows == ([None, 100] if packed else [100])
    monkeypatch.setenv("SUROGATE_ATTENTION", "dense")
    dense_loss = twin(**batch).loss
    dense_loss.backward()
    torch.testing.assert_close(flex_loss, dense_loss, rtol=5e-3, atol=0)
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if p.requires_grad:
            rel = ((p.grad.float() - q.grad.float()).norm() / q.grad.float().norm()).item()
            assert rel < 3e-2, (n, rel)


@pytest.mark.gpu
def test_padded_batches_of_many_lengths_replay_per_bucket_and_follow_eager():
    """Lengths 70..300 fall into 3 buckets of 128: three graphs, every call replayed, losses as eager."""
    model, twin = _pair("llama")
    g = torch.Generator("cuda").manual_seed(3)
    batches = []
    for length in (70, 300, 129, 100, 250, 77):
        ids = torch.randint(1, 120, (2, length), device="cuda", generator=g)
        labels = ids.clone()
        labels[1, length // 2:] = -100  # the second row is shorter: right padding masked from the loss
        batches.append({"input_ids": ids, "labels": labels})
    step = GraphedStep(model, loss_scale=0.25, strict=True)
    losses = torch.stack([step(**b).clone() for b in batches])
    expected = torch.stack([_eager_step(twin, b, 0.25) for b in batches])
    assert len(step.graphs) == 3 and step.replays == 6 and step.eager_calls == 0
    torch.testing.assert_close(losses, expected, rtol=2e-3, atol=0)


class _SyncsWhileCapturing(torch.nn.Module):
    """Wraps a model; its forward reads a value back to the host during capture (not allowed there)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        out = self.model(**inputs)
        if torch.cuda.is_current_stream_capturing():
            out.loss.sum().item()
        return out


@pytest.mark.gpu
def test_a_failed_capture_leaves_the_process_whole():
    model, twin = _pair("llama")
    wrapped = _SyncsWhileCapturing(model)
    g = torch.Generator("cuda").manual_seed(4)
    batch = {"input_ids": (ids := torch.randint(1, 120, (2, 64), device="cuda", generator=g)), "labels": ids}
    step = GraphedStep(wrapped, loss_scale=1.0)
    with pytest.warns(UserWarning, match="failed"):
        loss = step(**batch)
    assert step.failure is not None and step.eager_calls == 1 and not step.graphs
    torch.testing.assert_close(loss, _eager_step(twin, batch, 1.0), rtol=2e-3, atol=0)
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):  # warm-ups left no trace
        if p.requires_grad:
            assert F.cosine_similarity(p.grad.flatten().float(), q.grad.flatten().float(), dim=0) > 0.999, n
    # The CUDA RNG, the allocator and the current stream work as before: a new model trains in graphs.
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.randn(4, device="cuda")
    torch.nn.init.normal_(torch.empty(8, 8, device="cuda"))
    fresh, _ = _pair("qwen3")
    fresh_step = GraphedStep(fresh, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(3):
            assert torch.isfinite(fresh_step(**batch))
    assert fresh_step.replays == 3 and fresh_step.failure is None
