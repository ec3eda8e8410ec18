"""The op layer: `torch.library` custom ops that FX passes and Inductor see as single nodes.

`surogate::lora_linear` is one LoRA linear (frozen, possibly quantized base GEMM + LoRA
branch), `surogate::lora_linear_backward` its backward. The plain-torch reference
(`surogate.kernels.reference`) is each op's default implementation, so the whole pipeline runs
and is tested without a GPU; the CUDA implementation (`surogate.kernels.launch`: the kernel
table's routes) is registered for CUDA tensors with `register_kernel("cuda")`. The schema carries
the weight format and precisions as strings (torch.library has no enum type); they become
`WeightFormat` / `Compute` here, once, and everything below takes the enums.
Contracts (weight lists per format, shapes, dtypes): docs/internals.md.

Gradient producer fusion: while torch.compile traces the backward, the autograd formula (`_backward`)
quantizes an FP8 dgrad's gradient itself, with the traceable twin of the op's quantizer, and passes it as
`grad_output_q`; Inductor then fuses that quantize into the kernel that produces the gradient (the SwiGLU
backward, the RMSNorm backward with the residual's gradient). The compile backend holds `grad_producer(...)`
around AOTAutograd (`surogate.compile(..., grad_producer=True)`, the default); eagerly it is off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from surogate.compat import compiling
from surogate.kernels import reference
from surogate.kernels.variants import WEIGHT_LISTS, weight_format_of
from surogate.recipes import Compute, WeightFormat

# What the traced wrappers below check against: plain strings, because Dynamo (torch 2.11) graph-breaks
# on calling or iterating an Enum class, and a break there splits the LoRA linear the passes must see whole.
_FORMATS = frozenset(f.value for f in WeightFormat)
_COMPUTES = frozenset(c.value for c in Compute)
_LIST_LEN = {f.value: len(names) for f, names in WEIGHT_LISTS.items()}
_NF4 = WeightFormat.NF4.value


def _value(x: "str | WeightFormat | Compute") -> str:
    """The schema's string for a format or precision given as a member or as its value (traceable)."""
    return x if type(x) is str else x.value

_check_finite = False


@contextlib.contextmanager
def check_finite(enabled: bool = True) -> Iterator[None]:
    """Raise `FloatingPointError` when an activation or gradient entering a LoRA linear is NaN/Inf.

    Off by default: the check reads a flag back from the GPU (one host sync per linear).
    Turn it on to find the first layer where a run goes non-finite.
    """
    global _check_finite
    previous, _check_finite = _check_finite, enabled
    try:
        yield
    finally:
        _check_finite = previous


def set_check_finite(enabled: bool) -> None:
    """Switch the NaN/Inf check of `check_finite` on or off for the rest of the process."""
    global _check_finite
    _check_finite = enabled


def _assert_finite(tensor: Tensor, what: str) -> None:
    if _check_finite and not bool(torch.isfinite(tensor).all()):
        raise FloatingPointError(
            f"surogate: {what} of a LoRA linear {tuple(tensor.shape)} contains NaN or Inf. The values came "
            "from the layer before it; lower the learning rate, check the data, or try recipe='bf16' "
            "to see whether low precision is the cause.")


_grad_producer = False


@contextlib.contextmanager
def grad_producer(enabled: bool = True) -> Iterator[None]:
    """Whether a compiled backward quantizes an FP8 dgrad's gradient in the graph (off unless held on).

    Read by `_backward` while AOTAutograd traces it, so it is the compile-time state that counts: the surogate
    backend (`surogate.compile(..., grad_producer=...)`) holds this around the AOTAutograd/Inductor call.
    Why a flag and not an FX pass: the passes run on the forward graph Dynamo captures; the backward graph
    does not exist until AOTAutograd traces it by running this module's autograd formula, and after that
    Inductor partitions and lowers it within the same call (a joint-graph pass would be Inductor's global
    `joint_custom_pre_pass`, absent under aot_eager, rewriting aten-level nodes). The formula is the one
    place every backend traces, and a flag read there at trace time decides what the graph holds. The
    compile caches cannot see the flag, so the backend puts its options into their keys
    (`compat.compile_options_cache_tag`).
    """
    global _grad_producer
    previous, _grad_producer = _grad_producer, enabled
    try:
        yield
    finally:
        _grad_producer = previous


def out_features(weight: Sequence[Tensor], weight_format: "str | WeightFormat", in_features: int) -> int:
    """N of the frozen (N x K) weight held in `weight`, whatever its format."""
    if _value(weight_format) == _NF4:
        return weight[0].numel() * 2 // in_features
    return weight[0].shape[0]


# Written out because infer_schema has no optional tensor list (`input_q`).
_LORA_LINEAR_SCHEMA = ("(Tensor input, Tensor[] weight, str weight_format, Tensor? lora_a, Tensor? lora_b, "
                       "Tensor? lora_input, Tensor? bias, float lora_scale, str forward, str grad_input, "
                       "Tensor[]? input_q=None) -> (Tensor, Tensor, Tensor, Tensor)")


def _cast_factors(lora_a: Tensor | None, lora_b: Tensor | None, input: Tensor) -> tuple[Tensor, Tensor]:
    """(lora_a_cast, lora_b_cast): the LoRA factors in the compute dtype (`input`'s), cast once by the forward
    and saved for the backward, which would otherwise cast the FP32 masters again (two launches per LoRA linear
    and micro-step, tests/test_launch_copies.py). A factor that is absent or already in that dtype gets an empty
    tensor instead: an op output may not alias an input, and such a factor needs no cast. The fake
    implementation decides the same from the dtypes (`_cast_shape`); the CUDA one makes the same casts in one
    kernel launch with what its route reads of them (`launch.lora_linear_with_casts_cuda`)."""
    return tuple(input.new_empty(0) if t is None or t.dtype == input.dtype else t.to(input.dtype)
                 for t in (lora_a, lora_b))


def _cast_shape(t: Tensor | None, dtype: torch.dtype) -> tuple[int, ...]:
    return (0,) if t is None or t.dtype == dtype else tuple(t.shape)


@torch.library.custom_op("surogate::lora_linear", mutates_args=(), schema=_LORA_LINEAR_SCHEMA)
def _lora_linear_op(
    input: Tensor,
    weight: list[Tensor],
    weight_format: str,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    lora_input: Tensor | None,
    bias: Tensor | None,
    lora_scale: float,
    forward: str,
    grad_input: str,
    input_q: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The CPU (and default) implementation: the plain-torch reference; -> (output, lora_hidden, lora_a_cast,
    lora_b_cast), the last two kept for the backward (`_cast_factors`)."""
    _assert_finite(input, "the input")
    output, hidden = reference.lora_linear_ref(input, weight, WeightFormat(weight_format), lora_a, lora_b, lora_input,
                                               bias, lora_scale, Compute(forward), Compute(grad_input), input_q)
    return output, hidden, *_cast_factors(lora_a, lora_b, input)


@_lora_linear_op.register_kernel("cuda")
def lora_linear_cuda(input, weight, weight_format, lora_a, lora_b, lora_input, bias, lora_scale, forward, grad_input,
                     input_q=None):
    """The CUDA implementation (tests call it on CPU tensors, the Triton kernels under the interpreter); the
    launcher casts the factors (`_cast_factors`' outputs) in the same launch as what its route reads of them."""
    from surogate.kernels import launch

    _assert_finite(input, "the input")
    output, hidden, a_cast, b_cast = launch.lora_linear_with_casts_cuda(
        input, weight, WeightFormat(weight_format), lora_a, lora_b, lora_input, bias, lora_scale, Compute(forward),
        Compute(grad_input), input_q)
    return output, hidden, _empty_if_none(a_cast, input), _empty_if_none(b_cast, input)


@_lora_linear_op.register_fake
def _(input, weight, weight_format, lora_a, lora_b, lora_input, bias, lora_scale, forward, grad_input, input_q=None):
    n = out_features(weight, weight_format, input.shape[-1])
    rank = 0 if lora_a is None else lora_a.shape[0]
    output = input.new_empty((*input.shape[:-1], n))
    lora_hidden = input.new_empty((*input.shape[:-1], rank))
    return (output, lora_hidden, input.new_empty(_cast_shape(lora_a, input.dtype)),
            input.new_empty(_cast_shape(lora_b, input.dtype)))


_LORA_LINEAR_BACKWARD_SCHEMA = ("(Tensor grad_output, Tensor input, Tensor[] weight, str weight_format, "
                                "Tensor? lora_a, Tensor? lora_b, Tensor? lora_input, Tensor? lora_hidden, "
                                "float lora_scale, str grad_input, Tensor[]? grad_output_q=None, "
                                "Tensor? lora_a_cast=None, Tensor? lora_b_cast=None, Tensor[]? input_q=None) "
                                "-> (Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("surogate::lora_linear_backward", mutates_args=(), schema=_LORA_LINEAR_BACKWARD_SCHEMA)
def _lora_linear_backward_op(
    grad_output: Tensor,
    input: Tensor,
    weight: list[Tensor],
    weight_format: str,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    lora_input: Tensor | None,
    lora_hidden: Tensor | None,
    lora_scale: float,
    grad_input: str,
    grad_output_q: list[Tensor] | None = None,
    lora_a_cast: Tensor | None = None,
    lora_b_cast: Tensor | None = None,
    input_q: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_input, grad_lora_a, grad_lora_b, grad_lora_input); absent ones are empty tensors.

    `input_q` (the forward's FP8 copy of the input, kept instead of it: `save_input_q`) is what LoRA A's gradient
    reads then, dequantized; `input` only gives the shape (the autograd formula passes the FP8 data), and the
    input gradient takes `grad_output`'s dtype.

    `grad_output_q` (FP8 dgrads only: `grad_output_quantizer(grad_input, weight_format)(grad_output)`) is the
    gradient already quantized for the dgrad GEMM; the LoRA gradients read the bf16 `grad_output`.
    `lora_a_cast` / `lora_b_cast` are `lora_a` / `lora_b` in the compute dtype as the forward cast them (its
    outputs 2 and 3); the CUDA implementation reads them instead of casting again (the reference casts; the
    values are the same). The gradients take the masters' dtype."""
    _assert_finite(grad_output, "the gradient")
    if input_q is not None:
        input = reference.dequantize_input_q(input_q, grad_output.dtype)
    grads = reference.lora_linear_backward_ref(grad_output, input, weight, WeightFormat(weight_format), lora_a,
                                               lora_b, lora_input, lora_hidden, lora_scale, Compute(grad_input),
                                               grad_output_q)
    return tuple(_empty_if_none(g, grad_output).contiguous() for g in grads)


@_lora_linear_backward_op.register_kernel("cuda")
def lora_linear_backward_cuda(grad_output, input, weight, weight_format, lora_a, lora_b, lora_input, lora_hidden,
                              lora_scale, grad_input, grad_output_q=None, lora_a_cast=None, lora_b_cast=None,
                              input_q=None):
    """The CUDA implementation of the backward (as `lora_linear_cuda`)."""
    from surogate.kernels import launch

    _assert_finite(grad_output, "the gradient")
    grads = launch.lora_linear_backward_cuda(grad_output, input, weight, WeightFormat(weight_format), lora_a, lora_b,
                                             lora_input, lora_hidden, lora_scale, Compute(grad_input), grad_output_q,
                                             lora_a_cast, lora_b_cast, input_q)
    return tuple(_empty_if_none(g, grad_output).contiguous() for g in grads)


@_lora_linear_backward_op.register_fake
def _(grad_output, input, weight, weight_format, lora_a, lora_b, lora_input, lora_hidden, lora_scale, grad_input,
      grad_output_q=None, lora_a_cast=None, lora_b_cast=None, input_q=None):
    # Contiguous whatever the inputs' strides, as the implementations' GEMMs write them: `empty_like` of an input
    # that is a transposed view (Falcon-Mamba's x_proj reads one) would promise its strides, and Inductor's
    # stride assertion failed in the backward. With `input_q`, `input` is the FP8 data: the gradient is bf16.
    grad_in = input.new_empty(input.shape, dtype=grad_output.dtype if input_q is not None else input.dtype)
    return (grad_in, *(grad_output.new_empty(0) if t is None else t.new_empty(t.shape)
                       for t in (lora_a, lora_b, lora_input)))


_save_input_q = False


@contextlib.contextmanager
def save_input_q(enabled: bool = True) -> Iterator[None]:
    """Whether a compiled op given `input_q` keeps that FP8 copy of its input for the backward instead of the
    bf16 input (off unless held on; `surogate.compile(..., save_fp8_inputs=...)`, passes/save_fp8.py).

    The backward reads the input only for LoRA A's gradient, `s * (g @ B)^T @ x`; it then reads the input the
    FP8 forward GEMM read, dequantized where it is read (the backward op's `input_q`; on CUDA in the loads of
    `kernels/grad_lora_fp8.py`): about half the bytes kept between forward and backward for the norm / SwiGLU
    outputs, and nothing rebuilt. Read by `_setup_context` while AOTAutograd traces the forward, like
    `grad_producer`; eagerly the op keeps its input as given.
    """
    global _save_input_q
    previous, _save_input_q = _save_input_q, enabled
    try:
        yield
    finally:
        _save_input_q = previous


def _empty_if_none(tensor: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if tensor is None else tensor


def _setup_context(ctx, inputs, output) -> None:
    input, weight, weight_format, lora_a, lora_b, lora_input, bias, lora_scale, forward, grad_input, input_q = inputs
    ctx.n_input_q = None if input_q is None else len(input_q)
    ctx.n_weight = len(weight)
    ctx.weight_format = weight_format
    ctx.lora_scale = lora_scale
    ctx.grad_input_precision = grad_input
    ctx.has_lora = lora_a is not None
    ctx.has_lora_input = lora_input is not None
    # The backward reads the input for LoRA A's gradient (and its shape and dtype); kept as the forward's FP8
    # copy it is half the bytes (`save_input_q`).
    ctx.input_dtype = input.dtype
    ctx.input_from_q = input_q is not None and _save_input_q and compiling()
    saved = [*input_q, *weight] if ctx.input_from_q else [input, *weight]
    if ctx.has_lora:
        saved += [lora_a, lora_b, output[1], output[2], output[3]]
    if ctx.has_lora_input:
        saved.append(lora_input)
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_output: Tensor, *internal: Tensor | None):
    # lora_hidden and the factors' casts are internal outputs kept for this backward; nothing downstream
    # differentiates them.
    saved = list(ctx.saved_tensors)
    n_input = ctx.n_input_q if ctx.input_from_q else 1
    kept, weight, rest = saved[:n_input], saved[n_input:n_input + ctx.n_weight], saved[n_input + ctx.n_weight:]
    # Kept in FP8 (`save_input_q`), the op reads the copy and takes the FP8 data for the input's shape.
    input, input_q = kept[0], (kept if ctx.input_from_q else None)
    lora_a = lora_b = lora_hidden = lora_input = a_cast = b_cast = None
    if ctx.has_lora:
        lora_a, lora_b, lora_hidden, a_cast, b_cast, rest = rest[0], rest[1], rest[2], rest[3], rest[4], rest[5:]
        a_cast, b_cast = (None if t.numel() == 0 else t for t in (a_cast, b_cast))
    if ctx.has_lora_input:
        lora_input = rest[0]
    grad_output = grad_output.contiguous()
    g_input, g_a, g_b, g_lora_input = torch.ops.surogate.lora_linear_backward(
        grad_output, input, weight, ctx.weight_format, lora_a, lora_b, lora_input, lora_hidden,
        ctx.lora_scale, ctx.grad_input_precision, _grad_output_q(ctx, grad_output),
        lora_a_cast=a_cast, lora_b_cast=b_cast, input_q=input_q)
    if input_q is not None and g_input.dtype != ctx.input_dtype:
        g_input = g_input.to(ctx.input_dtype)  # the op gives grad_output's dtype then
    grads = (
        g_input,
        [None] * ctx.n_weight,  # the frozen weight never gets a gradient
        None,
        g_a if ctx.has_lora else None,
        g_b if ctx.has_lora else None,
        g_lora_input if ctx.has_lora_input else None,
        None,  # bias: the base layer is frozen
        None,
        None,
        None,
        # input_q: a function of `input` whose gradient the dgrad above already is (straight through)
        None if ctx.n_input_q is None else [None] * ctx.n_input_q,
    )
    # The dispatcher drops a trailing argument equal to its default (input_q=None) before autograd sees
    # the call; needs_input_grad has one entry per argument actually passed, and so must the result.
    return grads[:len(ctx.needs_input_grad)]


torch.library.register_autograd("surogate::lora_linear", _backward, setup_context=_setup_context)


def _grad_output_q(ctx, grad_output: Tensor) -> list[Tensor] | None:
    """The dgrad's quantized gradient, put into the graph while a compile traces this backward (gradient
    producer fusion, `grad_producer`); None eagerly, when off, and for dgrads that take no `grad_output_q`.

    Eagerly nothing would fuse, and the twin would run as a dozen torch kernels where the op runs one. A
    gradient in another dtype than the input is left to the op (the reference quantizes it after a cast to
    the input dtype, the twin would not)."""
    if not (_grad_producer and compiling()) or grad_output.dtype != ctx.input_dtype:
        return None
    quantizer = reference.grad_output_quantizer(ctx.grad_input_precision, ctx.weight_format)
    return None if quantizer is None else list(quantizer(grad_output))


def validate(input: Tensor, weight: Sequence[Tensor], weight_format: str, lora_a: Tensor | None,
             lora_b: Tensor | None, forward: str, grad_input: str, input_q: Sequence[Tensor] | None = None) -> None:
    """Shape/format checks with messages that say what to do; cheap, and traced once under compile."""
    fmt = _value(weight_format)
    if fmt not in _FORMATS:
        raise ValueError(f"unknown weight_format {weight_format!r}; valid: {', '.join(sorted(_FORMATS))}")
    for name, value in (("forward", _value(forward)), ("grad_input", _value(grad_input))):
        if value not in _COMPUTES:
            raise ValueError(f"unknown {name} precision {value!r}; valid: {', '.join(sorted(_COMPUTES))}")
    if len(weight) != _LIST_LEN[fmt]:
        raise ValueError(f"weight_format {fmt!r} takes {_LIST_LEN[fmt]} tensors, got {len(weight)}; "
                         f"build the list with surogate.ops.prepare_weight")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating tensor, got {input.dtype}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("pass both lora_a and lora_b, or neither")
    if lora_a is not None:
        n = out_features(weight, weight_format, input.shape[-1])
        if lora_a.shape[1] != input.shape[-1] or lora_b.shape != (n, lora_a.shape[0]):
            raise ValueError(f"LoRA shapes do not fit: input (..., {input.shape[-1]}), weight N={n}, "
                             f"lora_a {tuple(lora_a.shape)} (want (r, {input.shape[-1]})), lora_b "
                             f"{tuple(lora_b.shape)} (want ({n}, r))")
    if input_q is not None:
        reference.check_input_q(input_q, input, weight_format, forward)


def input_quantizer(forward: "str | Compute", weight_format: "str | WeightFormat"):
    """The traceable function whose outputs an FP8 forward reads as `input_q` (the kernel table's
    quantizer of that variant, in plain torch), or None when the forward quantizes its input itself."""
    return reference.input_quantizer(forward, weight_format)


def grad_output_quantizer(grad_input: "str | Compute", weight_format: "str | WeightFormat"):
    """The traceable function whose outputs an FP8 dgrad reads as `grad_output_q` (the kernel table's quantizer
    of that variant, in plain torch), or None when the dgrad quantizes nothing or its gradient itself."""
    return reference.grad_output_quantizer(grad_input, weight_format)


def lora_linear(
    input: Tensor,
    weight: Sequence[Tensor],
    weight_format: str = "bf16",
    lora_a: Tensor | None = None,
    lora_b: Tensor | None = None,
    lora_input: Tensor | None = None,
    bias: Tensor | None = None,
    lora_scale: float = 1.0,
    forward: str = "bf16",
    grad_input: str = "bf16",
    input_q: Sequence[Tensor] | None = None,
) -> Tensor:
    """`Q(input) @ W.T (+ bias) + lora_scale * (lora_input or input) @ lora_a.T @ lora_b.T`, differentiable.

    Gradients flow to `input`, `lora_a`, `lora_b` and `lora_input`; never to the frozen weight or bias.
    `input_q` is Q(input) already computed (FP8 forwards only: `input_quantizer(forward,
    weight_format)(input)`), so that the producer of `input` can emit it; it gets no gradient.
    """
    validate(input, weight, weight_format, lora_a, lora_b, forward, grad_input, input_q)
    return torch.ops.surogate.lora_linear(input, list(weight), _value(weight_format), lora_a, lora_b, lora_input, bias,
                                          float(lora_scale), _value(forward), _value(grad_input),
                                          None if input_q is None else list(input_q))[0]


def prepare_weight(weight: Tensor, weight_format: "str | WeightFormat") -> list[Tensor]:
    """The tensors that hold the frozen `weight` (N x K) in `weight_format` (docs/internals.md).

    CUDA weights are quantized by the Triton kernels, CPU weights by the reference; both are
    bit-identical by test.
    """
    fmt = weight_format_of(weight_format)
    if weight.dim() != 2:
        raise ValueError(f"a frozen linear weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    with torch.no_grad():
        if weight.is_cuda:
            from surogate.kernels import quantize

            return list(quantize.quantize_weight(weight, fmt))
        return list(reference.quantize_weight_ref(weight, fmt))
