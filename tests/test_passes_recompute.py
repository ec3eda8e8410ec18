"""Pass 5 (`recompute_producers`): the RMSNorm / SwiGLU outputs, the attention output's layout copy and the
attention's q/k/v that the forward would keep are rebuilt in the backward instead, with the same numbers.

What the forward keeps is read from Inductor's min-cut partition of the graph surogate's backend receives
(bench/saved_activations.py's `kept_for_backward`, the partitioner CUDA training runs)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from bench_module import load_bench
from test_compile_models import tiny_config

import surogate
from surogate.passes import nodes as N
from surogate.passes.capture import capture_graph
from surogate.passes.recompute import attention_input_nodes, input_producer, producer_nodes

TOKENS = 40  # no other dimension of the model is 40: the sequence dimension is told apart by its size
saved_activations = load_bench("saved_activations")


def _qwen3(seed: int = 0, layers: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = T.Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, vocab_size=128)
    return T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)


def _kept(recipe: str, recompute: bool) -> list[dict]:
    torch.manual_seed(1)
    return saved_activations.kept_for_backward(_qwen3(), recipe, TOKENS, recompute_producers=recompute)


def _computed(records: list[dict]) -> list[tuple]:
    """(op, dtype, last dim) of every computed kept tensor with a sequence dimension."""
    return sorted((r["kind"], r["dtype"], r["shape"][-1]) for r in records if r["kind"] != "input" and TOKENS in r["shape"])


@pytest.mark.parametrize("recipe", ["bf16", "qfp8"])
def test_recompute_keeps_a_layer_in_less_than_60_percent_of_the_bytes(recipe):
    off, on = _kept(recipe, False), _kept(recipe, True)
    b_off = saved_activations.activation_bytes_per_token(off, TOKENS)
    b_on = saved_activations.activation_bytes_per_token(on, TOKENS)
    assert b_on < 0.6 * b_off, (b_off, b_on, _computed(on))
    kept_on = _computed(on)
    # What is left: the QKV output once (q 256, k 128, v 128 wide), the attention output once (in its
    # (B, H, T, D) layout), the residual stream between the halves, SwiGLU's g and u; none of the
    # normalized hidden states (width 256 from a mul), the SwiGLU product (512 from a mul) or RoPE's sums.
    assert not [k for k in kept_on if k[0] == "mul.Tensor" and k[1] == "bfloat16"], kept_on
    assert not [k for k in kept_on if k[0] == "add.Tensor" and k[2] == 64], kept_on  # q/k after RoPE


@pytest.mark.parametrize("recipe", ["bf16", "qfp8"])
def test_recompute_changes_no_number(recipe):
    """Rebuilding runs the same ops on the same tensors: loss and LoRA gradients equal bit for bit."""
    results = []
    for recompute in (False, True):
        model = surogate.compile(_qwen3(), recipe=recipe, arch="cpu", recompute_producers=recompute)
        torch.manual_seed(2)
        ids = torch.randint(0, 128, (2, 24))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        str(model.surogate_report)))
    (loss_off, grads_off, report_off), (loss_on, grads_on, report_on) = results
    assert torch.equal(loss_off, loss_on)
    assert grads_off.keys() == grads_on.keys() and len(grads_on) == 14
    assert all(torch.equal(grads_off[k], grads_on[k]) for k in grads_on)
    assert "rebuilt in the backward" not in report_off
    for what in ("rmsnorm -> GEMM input", "swiglu -> GEMM input", "layout copy -> GEMM input", "attention q/k/v"):
        assert what in report_on, report_on


# Mistral's layer is Llama's graph (same norms, RoPE, SwiGLU): `slow`. Gemma 3: (1 + w) norms, GELU-gated MLP.
@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3", pytest.param("mistral", marks=pytest.mark.slow)])
def test_recompute_on_other_architectures_changes_no_number(arch):
    losses = []
    report = ""
    for recompute in (False, True):
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(tiny_config(arch)).to(torch.bfloat16)
        model = surogate.compile(model, recipe="bf16", arch="cpu", recompute_producers=recompute)
        torch.manual_seed(3)
        ids = torch.randint(0, 128, (2, 16))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        losses.append((loss.detach(), grads))
        report = str(model.surogate_report)
    assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(losses[0][1], losses[1][1])
    mlp = "gated MLP" if arch == "gemma3" else "swiglu"
    assert f"{mlp} -> GEMM input: rebuilt" in report and "rmsnorm -> GEMM input: rebuilt" in report, report


def test_what_the_pass_tags_in_a_qwen3_layer():
    """The walk stops where rebuilding would cost more than a pointwise pass: the rsqrt (a reduction, kept
    at 4 bytes a token), the residual add, the GEMM outputs, the graph inputs."""
    model = _qwen3()
    layer = model.model.layers[0]
    x = torch.randn(1, 8, 256, dtype=torch.bfloat16)
    position = model.model.rotary_emb(x, torch.arange(8)[None])
    gm, _ = capture_graph(lambda h: layer(h, position_embeddings=position)[0], x)
    g = gm.graph
    mlp_in = [n for n in g.nodes if input_producer(n) == "swiglu"]
    assert len(mlp_in) == 1
    swiglu = producer_nodes(mlp_in[0])
    assert any(N.is_call(n, (torch.nn.functional.silu,)) or N.is_method(n, ("silu",)) for n in swiglu)
    norms = [n for n in g.nodes if input_producer(n) == "rmsnorm"]
    assert norms, "the input and post-attention norms"
    for norm in norms:
        tagged = producer_nodes(norm)
        assert not any(N.is_call(n, (torch.rsqrt,)) or N.is_method(n, ("rsqrt",)) for n in tagged)
        assert all(n.op == "call_function" or n.op == "call_method" for n in tagged)
    attention = next(n for n in g.nodes if N.is_call(n, (torch.nn.functional.scaled_dot_product_attention,)))
    rebuilt = attention_input_nodes(attention)
    assert not any(n.op == "placeholder" for n in rebuilt)
    assert any(N.is_add(n) for n in rebuilt)  # RoPE's q * cos + rotate_half(q) * sin
    assert not any(N.is_call(n, (torch.rsqrt,)) for n in rebuilt)


# --- "auto": keep the producers where GPU memory is plenty -----------------------------------------------

GIB = 1 << 30


@pytest.mark.parametrize("recipe, free, rebuild", [
    ("bf16", 100 * GIB, False), ("fp8", 100 * GIB, False),  # bf16 weights kept: speed first where memory allows
    ("bf16", 4 * GIB, True),  # 1 GiB would be 25% of what is free: rebuilt
    ("bf16", None, True),  # the CPU backend
    ("qfp8", 100 * GIB, True), ("qnf4", 100 * GIB, True),  # quantized storage: memory first
])
def test_auto_keeps_the_producers_only_for_bf16_weights_and_plenty_of_memory(recipe, free, rebuild):
    from surogate.passes.recompute import rebuild_producers
    from surogate.recipes import get

    decided, why = rebuild_producers("auto", get(recipe), GIB, free)
    assert decided is rebuild and why.startswith("recompute_producers auto: " + ("rebuilt" if rebuild else "kept"))
    assert rebuild_producers(True, get(recipe), GIB, free) == (True, "")
    assert rebuild_producers(False, get(recipe), GIB, free) == (False, "")


def test_auto_estimates_what_the_partition_keeps(monkeypatch):
    """What "auto" weighs (the rebuilt tensors' bytes, from the graph, times the blocks sharing it) is close to
    what rebuilding really takes off the forward's kept tensors under Inductor's partitioner."""
    from surogate.passes import recompute

    saved_partition = (saved_activations.activation_bytes_per_token(_kept("bf16", False), TOKENS)
                       - saved_activations.activation_bytes_per_token(_kept("bf16", True), TOKENS)) * TOKENS
    weighed, rebuild = [], recompute.rebuild_producers
    monkeypatch.setattr(recompute, "rebuild_producers", lambda *a: weighed.append(a[2]) or rebuild(*a))
    model = surogate.compile(_qwen3(layers=3), recipe="bf16", arch="cpu")
    ids = torch.randint(0, 128, (1, TOKENS))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(weighed) == 1  # one graph, shared by the 3 blocks
    assert 0.9 * 3 * saved_partition <= weighed[0] <= 1.1 * 3 * saved_partition, (weighed, saved_partition)


def _auto_compile(monkeypatch, recipe: str, free: int, **options):
    from surogate.passes import recompute

    monkeypatch.setattr(recompute, "free_device_bytes", lambda arch: free)
    model = surogate.compile(_qwen3(), recipe=recipe, arch="cpu", **options)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    return str(model.surogate_report)


def test_auto_is_the_default_and_says_what_it_chose(monkeypatch):
    report = _auto_compile(monkeypatch, "bf16", 100 * GIB)
    assert "recompute_producers auto: kept, not rebuilt" in report and "rebuilt in the backward" not in report, report
    report = _auto_compile(monkeypatch, "bf16", 1 << 10)
    assert "recompute_producers auto: rebuilt" in report and "swiglu -> GEMM input: rebuilt" in report, report
    report = _auto_compile(monkeypatch, "qfp8", 100 * GIB)
    assert "rebuilt (qfp8 stores its weights for memory" in report and "rebuilt in the backward" in report, report
    # Checkpointing asks for memory first: "auto" rebuilds without weighing.
    report = _auto_compile(monkeypatch, "bf16", 100 * GIB, checkpoint=True)
    assert "recompute_producers auto" not in report and "rebuilt in the backward" in report, report


def test_bad_recompute_producers_value_is_refused_before_anything_changes():
    model = _qwen3()
    with pytest.raises(ValueError, match="recompute_producers takes 'auto'"):
        surogate.compile(model, recipe="bf16", arch="cpu", recompute_producers="sometimes")
    assert not hasattr(model, "peft_config")
