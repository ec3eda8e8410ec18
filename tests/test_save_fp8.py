"""`save_fp8_inputs` (passes/save_fp8.py): LoRA linears with an FP8 forward keep the FP8 copy of their input
for the backward instead of the bf16 input.

What the forward keeps is read from Inductor's min-cut partition (bench/saved_activations.py's
`kept_for_backward`, the partitioner CUDA training runs). The numbers: only LoRA A's gradients may change, and
they must be exactly what the op's backward gives for the dequantized FP8 input."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from bench_module import load_bench
from test_compile_models import tiny_config

import surogate
from surogate import ops
from surogate.kernels import reference
from surogate.passes.save_fp8 import keep_in_fp8

TOKENS = 40  # no other dimension of the model is 40: the sequence dimension is told apart by its size
saved_activations = load_bench("saved_activations")


def _qwen3(layers: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, vocab_size=128)
    return T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)


# --- the dequantizer the backward runs ----------------------------------------------------------------

@pytest.mark.parametrize("forward, fmt, k", [("fp8", "fp8_row", 256), ("fp8", "fp8_block", 256),
                                             ("fp8", "fp8_block", 200)])  # 200: a ragged last 1 x 128 block
def test_dequantize_input_q_is_the_reference_dequantization(forward, fmt, k):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, k) * torch.logspace(-3, 3, k)).to(torch.bfloat16)
    quantizer = reference.input_quantizer(forward, fmt)
    data, scale = quantizer(x)
    out = reference.dequantize_input_q([data, scale], torch.bfloat16)
    scaling, block = ("row", None) if fmt == "fp8_row" else ("block", (1, 128))
    expected = reference.dequantize_fp8_ref(reference.quantize_fp8_ref(x, "e4m3", scaling, block), torch.bfloat16)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    assert not torch.equal(out, x)  # E4M3 keeps 3 mantissa bits: the round trip is not the identity...
    # ...but within half a step: 1/16 of the value where it is normal (plus the bf16 rounding of the result),
    # half the subnormal step (2^-9 of the scale) where it is not.
    s = scale if fmt == "fp8_row" else scale.repeat_interleave(128, -1)[..., :k]
    assert ((out.float() - x.float()).abs() <= x.float().abs() * (1 / 16 + 1 / 256) + s * 2.0 ** -10).all()


# --- the op: what its backward reads ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["fp8_row", "fp8_block"])
def test_compiled_op_keeping_input_q_gives_the_gradients_of_the_dequantized_input(fmt):
    """Compiled with `save_input_q`, grad A is the eager op's for the dequantized input (exactly), grad B and the
    input gradient the eager op's for the input itself (exactly)."""
    torch.manual_seed(1)
    k, n, r = 256, 384, 8
    x = torch.randn(2, 16, k, dtype=torch.bfloat16)
    weight = ops.prepare_weight(torch.randn(n, k) / 16, fmt)
    a0, b0 = torch.randn(r, k) / 16, torch.randn(n, r) / 16
    grad = torch.randn(2, 16, n, dtype=torch.bfloat16)
    quantizer = ops.input_quantizer("fp8", fmt)

    def step(inp, with_q, compiled):
        inp = inp.clone().requires_grad_(True)
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)

        def fn(inp, a, b):
            return ops.lora_linear(inp, weight, fmt, a, b, lora_scale=2.0, forward="fp8", grad_input="fp8",
                                   input_q=quantizer(inp) if with_q else None)

        with ops.save_input_q(compiled):
            out = (torch.compile(fn, backend="aot_eager", fullgraph=True) if compiled else fn)(inp, a, b)
        out.backward(grad)
        return out.detach(), inp.grad, a.grad, b.grad

    torch._dynamo.reset()
    out, gx, ga, gb = step(x, True, True)
    ref_out, ref_gx, _, ref_gb = step(x, True, False)
    x_q = reference.dequantize_input_q(quantizer(x), torch.bfloat16)
    _, _, ref_ga, _ = step(x_q, False, False)
    _, _, bf16_ga, _ = step(x, True, False)
    assert torch.equal(out, ref_out) and torch.equal(gx, ref_gx) and torch.equal(gb, ref_gb)
    assert torch.equal(ga, ref_ga)
    assert not torch.equal(ga, bf16_ga)  # it did read the FP8 copy
    assert torch.nn.functional.cosine_similarity(ga.flatten(), bf16_ga.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("fmt, k, r", [("fp8_row", 256, 8), ("fp8_block", 384, 16), ("fp8_block", 200, 24),
                                       ("fp8_row", 64, 32)])
def test_the_cuda_backward_reading_input_q_matches_it_reading_the_dequantized_input(fmt, k, r):
    """The CUDA implementation (Triton under the interpreter): A's gradient from `grad_lora_fp8`'s kernel, which
    dequantizes in its loads, against cuBLAS's path on the dequantized input (same bf16 values, FP32 sums in
    another order); B's gradient and the input gradient the same numbers (they never read the input)."""
    from surogate.kernels import launch

    torch.manual_seed(2)
    m, n = 150, 256  # 150 rows: not a multiple of the kernel's 64-row tiles
    x = (torch.randn(3, m // 3, k) * 4).to(torch.bfloat16)
    weight = ops.prepare_weight(torch.randn(n, k) / 16, fmt)
    a, b = torch.randn(r, k) / 16, torch.randn(n, r) / 16
    go = torch.randn(3, m // 3, n, dtype=torch.bfloat16)
    h = (x.float() @ a.t()).to(torch.bfloat16)
    input_q = list(ops.input_quantizer("fp8", fmt)(x))
    x_q = reference.dequantize_input_q(input_q, torch.bfloat16)
    want = launch.lora_linear_backward_cuda(go, x_q, weight, fmt, a, b, None, h, 2.0, "fp8")
    got = launch.lora_linear_backward_cuda(go, input_q[0], weight, fmt, a, b, None, h, 2.0, "fp8", input_q=input_q)
    assert got[0].dtype == torch.bfloat16 and got[0].shape == x.shape and got[1].dtype == a.dtype
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    # A's gradient against its formula in FP32 (the CPU's stand-in for cuBLAS rounds the product to bf16; on
    # CUDA cuBLAS writes it in FP32, as the kernel does).
    gh = go.reshape(m, n) @ b.to(torch.bfloat16)
    want_a = (gh.float().t() @ x_q.reshape(m, k).float()) * 2.0
    torch.testing.assert_close(got[1], want_a, rtol=1e-5, atol=1e-5 * want_a.abs().max().item())
    bf16 = launch.lora_linear_backward_cuda(go, x, weight, fmt, a, b, None, h, 2.0, "fp8")
    assert not torch.allclose(got[1], bf16[1], rtol=1e-5, atol=0)  # it read the FP8 copy, not the input


# --- the pass on a model ------------------------------------------------------------------------------

def _kept(recipe: str, **options) -> list[dict]:
    torch.manual_seed(1)
    return saved_activations.kept_for_backward(_qwen3(), recipe, TOKENS, **options)


def _fp8_kept(records: list[dict]) -> list[int]:
    return sorted(r["shape"][-1] for r in records if r["kind"] != "input" and TOKENS in r["shape"]
                  and r["dtype"].startswith("float8"))


@pytest.mark.parametrize("recipe", ["fp8", "qfp8"])
def test_keeping_fp8_copies_keeps_fewer_bytes_than_keeping_the_bf16_inputs(recipe):
    bf16 = _kept(recipe, recompute_producers=False, save_fp8_inputs=False)
    fp8 = _kept(recipe, recompute_producers=False, save_fp8_inputs=True)
    b_bf16 = saved_activations.activation_bytes_per_token(bf16, TOKENS)
    b_fp8 = saved_activations.activation_bytes_per_token(fp8, TOKENS)
    assert b_fp8 < 0.9 * b_bf16, (b_bf16, b_fp8)
    # One FP8 copy per GEMM input: q/k/v's and gate/up's norm outputs, o_proj's attention output (256), h (512).
    assert _fp8_kept(fp8) == [256, 256, 256, 512] and _fp8_kept(bf16) == []
    # None of the bf16 norm outputs (width 256 from a mul) or the SwiGLU product (512 from a mul) is kept.
    assert not [r for r in fp8 if r["kind"] == "mul.Tensor" and r["dtype"] == "bfloat16"], fp8


def test_with_producers_rebuilt_true_keeps_the_fp8_copies_and_rebuilds_nothing_of_them():
    """qfp8 rebuilds its producers (recompute "auto" on the CPU); True keeps the FP8 copies all the same (more
    bytes than rebuilding, which keeps nothing), and the partitioner does not rebuild them from the producers."""
    rebuilt = _kept("qfp8", save_fp8_inputs=False)
    fp8 = _kept("qfp8", save_fp8_inputs=True)
    assert _fp8_kept(fp8) == [256, 256, 256, 512] and _fp8_kept(rebuilt) == []
    assert not [r for r in fp8 if r["kind"] == "mul.Tensor" and r["dtype"] == "bfloat16"], fp8


def _train_step(recipe: str, arch_name: str = "qwen3", **options):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config(arch_name)).to(torch.bfloat16)
    model = surogate.compile(model, recipe=recipe, arch="cpu", **options)
    torch.manual_seed(1)
    with torch.no_grad():  # PEFT starts B at zero, which makes A's gradient zero whatever it reads
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (2, 24))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, str(model.surogate_report)


@pytest.mark.parametrize("recipe, arch_name", [("fp8", "qwen3"), ("qfp8", "qwen3"), ("qfp8", "llama")])
def test_only_lora_a_gradients_change_and_only_slightly(recipe, arch_name):
    loss_off, grads_off, _ = _train_step(recipe, arch_name, recompute_producers=False, save_fp8_inputs=False)
    loss_on, grads_on, report = _train_step(recipe, arch_name, recompute_producers=False, save_fp8_inputs="auto")
    assert "save_fp8_inputs auto: on" in report and "kept for the backward in FP8" in report, report
    assert torch.equal(loss_off, loss_on)
    assert grads_off.keys() == grads_on.keys() and len(grads_on) == 28
    changed = [k for k in grads_on if not torch.equal(grads_off[k], grads_on[k])]
    assert changed and all("lora_A" in k for k in changed), changed
    for k in changed:
        cos = torch.nn.functional.cosine_similarity(grads_off[k].flatten(), grads_on[k].flatten(), dim=0)
        assert cos > 0.999, (k, cos)


@pytest.mark.parametrize("option, rebuilt, keep", [
    ("auto", False, True),  # the inputs would be kept in bf16: keep the FP8 copies instead
    ("auto", True, False),  # the backward rebuilds them and keeps nothing
    (True, True, True), (False, False, False),
])
def test_auto_follows_what_recompute_decided(option, rebuilt, keep):
    decided, why = keep_in_fp8(option, rebuilt)
    assert decided is keep
    assert why.startswith("save_fp8_inputs auto: " + ("on" if keep else "off")) if option == "auto" else why == ""


def test_auto_is_off_where_producers_are_rebuilt_and_bf16_recipes_have_nothing_to_keep():
    _, _, report = _train_step("qfp8", save_fp8_inputs="auto")  # recompute "auto" rebuilds on the CPU
    assert "save_fp8_inputs auto: off" in report and "kept for the backward in FP8" not in report, report
    _, _, report = _train_step("fp8")  # off by default
    assert "save_fp8_inputs" not in report and "kept for the backward in FP8" not in report, report
    _, _, report = _train_step("bf16", recompute_producers=False, save_fp8_inputs="auto")
    assert "save_fp8_inputs" not in report and "kept for the backward in FP8" not in report, report


def test_bad_save_fp8_inputs_value_is_refused_before_anything_changes():
    model = _qwen3()
    with pytest.raises(ValueError, match="save_fp8_inputs takes False .* got 'sometimes'"):
        surogate.compile(model, recipe="fp8", arch="cpu", save_fp8_inputs="sometimes")
    assert not hasattr(model, "peft_config")


@pytest.mark.parametrize("arch_name, options", [("llama", {"checkpoint": True}), ("gemma2", {})])
def test_padded_batches_of_several_lengths_keep_the_loss_of_bf16_inputs(arch_name, options):
    """What a user runs: padded batches of three lengths (one dynamic graph), the prompt masked, with activation
    checkpointing (Llama) or Gemma-2's GeGLU ops (qfp8): the FP8 copies change no loss and every gradient is finite."""
    runs = []
    for save in (False, True):
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(tiny_config(arch_name)).to(torch.bfloat16)
        model = surogate.compile(model, recipe="qfp8", arch="cpu", save_fp8_inputs=save, **options)
        torch.manual_seed(3)
        losses = []
        for length in (17, 40, 9):
            ids = torch.randint(0, 128, (2, length))
            mask = torch.ones_like(ids)
            mask[1, length // 2:] = 0
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, : length // 3] = -100
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            losses.append(loss.detach())
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        runs.append((torch.stack(losses), str(model.surogate_report)))
    (loss_off, report_off), (loss_on, report_on) = runs
    assert torch.equal(loss_off, loss_on)
    assert report_on.count("kept for the backward in FP8") == 4 and "kept for the backward in FP8" not in report_off
