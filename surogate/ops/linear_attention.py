"""Gated DeltaNet layers (Qwen3.5, Qwen3.5-MoE, Qwen3-Next) under surogate: the delta rule as one op, packed
examples kept apart.

transformers runs the chunked gated delta rule in its PyTorch form when flash-linear-attention is not installed:
a Python loop over 64-token chunks. Dynamo unrolls that loop, so the graph and its compile time grow with the row
length (CPU Inductor, a 2-layer model: 54 s at 64 tokens, 153 s at 1,024), each new chunk count compiles again, and
on an H200 a 256-token first step did not finish in 250 s (bench/NOTES.md run 109). That form also ignores packed
rows' boundaries (`cu_seq_lens`): each example's recurrent state and short convolution run on from the example
before it.

`install` gives every such layer its own forward: transformers' code as it is (its LoRA linears compiled and
rewritten as everywhere else), with two of the module's globals replaced for that layer alone:
- `torch_chunk_gated_delta_rule` -> `surogate::gated_delta_rule`, a custom op that Dynamo sees as one node whatever
  the length. Its implementation is `ops/delta_rule.py`: transformers' PyTorch algorithm with its pass over chunks
  one Triton kernel each way on CUDA (H200, 2 x 2,048 tokens, 16 heads of 128: 4.7 ms forward + backward against
  transformers' 30.0 ms; bench/results/delta_rule_h200.md). Its backward runs the rule again under autograd (a
  second forward of the rule, as activation checkpointing would, instead of keeping its chunk intermediates).
  flash-linear-attention, where installed, is not used for training: fla 0.6 refuses Hopper under Triton < 3.7.1
  (the torch 2.11 stack's Triton 3.6) in its backward, mid-step (bench/NOTES.md run 113); generation (a KV cache)
  still runs transformers' function, fla's kernel where it is installed.
- `causal_conv1d_fn` (transformers <= 5.24) or `causal_conv1d_forward` (5.25, the convolution with its cache) -> the
  same causal depthwise convolution, reading no token of another segment.
Both read surogate's segment ids (`attention.SEGMENTS_KWARG`: packed rows, left padding). At a segment's first
token the rule's log-decay g is set to `RESET`: exp(RESET) underflows, so the state carried in is multiplied by
zero and the segment starts from an empty state, as it would alone (the first token's g then gets no gradient,
as alone, where it multiplies a zero state). Calls with a KV cache (generation) run transformers' functions as is.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surogate.compat import autograd_inside_op
from surogate.ops.attention import SEGMENTS_KWARG, check_segments_arrived
from surogate.ops.delta_rule import chunk_gated_delta_rule

# The module globals a DeltaNet forward calls: the rule, and the short convolution either directly (transformers
# <= 5.24: `causal_conv1d_fn(x, weight, bias, activation)`) or through its cache-aware wrapper (5.25:
# `causal_conv1d_forward(conv1d, x, cache, layer_idx, activation)`).
RULE, CONV, CONV_FORWARD = "torch_chunk_gated_delta_rule", "causal_conv1d_fn", "causal_conv1d_forward"
RESET = -100.0  # log-decay at a segment's first token: exp(-100) ~ 4e-44, the carried state is gone in FP32


def _segment_starts(segments: Tensor) -> Tensor:
    """(B, S) bool: the tokens whose segment differs from the token before (not the row's first: nothing before)."""
    starts = torch.zeros(segments.shape, dtype=torch.bool, device=segments.device)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return starts


def _rule(query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor, segments: Tensor | None,
          use_qk_l2norm: bool) -> Tensor:
    """The chunked rule (no initial state, no final state), each segment from an empty state."""
    if segments is not None:
        g = g.masked_fill(_segment_starts(segments).unsqueeze(-1), RESET)
    return chunk_gated_delta_rule(query, key, value, g, beta, use_qk_l2norm)


@torch.library.custom_op("surogate::gated_delta_rule", mutates_args=())
def _rule_op(query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor, segments: Tensor | None,
             use_qk_l2norm: bool) -> Tensor:
    """query/key (B, S, Hk, Dk), value (B, S, Hv, Dv), g/beta (B, S, Hv), segments (B|1, S) int or None ->
    (B, S, Hv, Dv) in the query's dtype."""
    return _rule(query, key, value, g, beta, segments, use_qk_l2norm).contiguous()


@_rule_op.register_fake
def _(query, key, value, g, beta, segments, use_qk_l2norm):
    return value.new_empty(value.shape, dtype=query.dtype)


@torch.library.custom_op("surogate::gated_delta_rule_backward", mutates_args=())
def _rule_backward_op(grad: Tensor, query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor,
                      segments: Tensor | None, use_qk_l2norm: bool) -> list[Tensor]:
    """The gradients w.r.t. query, key, value, g, beta (contiguous): the rule run again under autograd."""
    inputs = [t.detach().requires_grad_() for t in (query, key, value, g, beta)]
    with autograd_inside_op(), torch.enable_grad():
        out = _rule(*inputs, segments, use_qk_l2norm)
        grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    return [torch.zeros(t.shape, dtype=t.dtype, device=t.device) if d is None else d.contiguous()
            for t, d in zip(inputs, grads)]


@_rule_backward_op.register_fake
def _(grad, query, key, value, g, beta, segments, use_qk_l2norm):
    return [t.new_empty(t.shape) for t in (query, key, value, g, beta)]  # contiguous, as the real ones


def _setup_context(ctx, inputs, output) -> None:
    *tensors, segments, use_qk_l2norm = inputs
    ctx.use_qk_l2norm, ctx.has_segments = use_qk_l2norm, segments is not None
    ctx.save_for_backward(*tensors, *([segments] if segments is not None else []))


def _backward(ctx, grad: Tensor):
    saved = list(ctx.saved_tensors)
    segments = saved.pop() if ctx.has_segments else None
    grads = torch.ops.surogate.gated_delta_rule_backward(grad.contiguous(), *saved, segments, ctx.use_qk_l2norm)
    return (*grads, None, None)


torch.library.register_autograd("surogate::gated_delta_rule", _backward, setup_context=_setup_context)


def segment_conv1d(hidden_states: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                   segments: Tensor) -> Tensor:
    """transformers' causal depthwise convolution (hidden_states (B, C, S), weight (C, K)) where no tap reads a token
    of another segment: out[t] = bias + sum_i weight[:, i] * x[t - (K-1) + i] over taps in t's segment. In FP32,
    rounded to the weight's dtype once (as the convolution's output), then the activation."""
    from transformers.activations import ACT2FN

    width, length = weight.shape[-1], hidden_states.shape[-1]
    x, w, seg = hidden_states.float(), weight.float(), segments[:, None, :]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if bias is None else bias.float()[:, None].expand(x.shape)
    for i in range(width):
        shift = width - 1 - i
        tap = x if shift == 0 else F.pad(x, (shift, 0))[..., :length]
        if shift:  # before the row's start the tap is zero padding: the segment there does not matter
            tap = tap * (F.pad(seg, (shift, 0), value=-2)[..., :length] == seg)
        out = out + w[:, i, None] * tap
    out = out.to(weight.dtype)
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(hidden_states.dtype)


def _replacements(env: dict) -> dict[str, Callable]:
    """The globals of a modeling module (`env`) that a DeltaNet forward calls, as surogate runs them: the rule and
    whichever convolution entry the module has (transformers' own with a KV cache, or with no segments)."""
    original_rule = env[RULE]

    def rule(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
             use_qk_l2norm_in_kernel=False, **kwargs):
        if initial_state is not None or output_final_state:  # a KV cache: generation, transformers' own
            return original_rule(query, key, value, g=g, beta=beta, chunk_size=chunk_size, initial_state=initial_state,
                                 output_final_state=output_final_state,
                                 use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
        segments = kwargs.get(SEGMENTS_KWARG)
        check_segments_arrived("the gated delta rule", segments)
        out = torch.ops.surogate.gated_delta_rule(query, key, value, g, beta, segments, use_qk_l2norm_in_kernel)
        return out, None

    replaced: dict[str, Callable] = {RULE: rule}
    if CONV in env:
        original_conv = env[CONV]

        def conv(hidden_states, weight, bias=None, activation=None, **kwargs):
            segments = kwargs.get(SEGMENTS_KWARG)
            if segments is None:
                return original_conv(hidden_states, weight, bias, activation=activation, **kwargs)
            return segment_conv1d(hidden_states, weight, bias, activation, segments)

        replaced[CONV] = conv
    if CONV_FORWARD in env:
        original_forward = env[CONV_FORWARD]

        def conv_forward(conv1d, hidden_states, cache, layer_idx, activation=None, **kwargs):
            segments = kwargs.get(SEGMENTS_KWARG)
            if segments is None or cache is not None:  # no boundaries to keep, or a KV cache: transformers' own
                return original_forward(conv1d, hidden_states, cache, layer_idx, activation=activation, **kwargs)
            return segment_conv1d(hidden_states, conv1d.weight.squeeze(1), conv1d.bias, activation, segments)

        replaced[CONV_FORWARD] = conv_forward
    return replaced


def _deltanet_forward(module: nn.Module) -> types.FunctionType | None:
    """The undecorated forward of `module`'s class when it calls transformers' chunked delta rule and short
    convolution through its modeling module's globals (the DeltaNet layers); else None."""
    forward = inspect.unwrap(type(module).forward)
    if not isinstance(forward, types.FunctionType):
        return None
    names, env = forward.__code__.co_names, forward.__globals__
    calls = {name for name in (RULE, CONV, CONV_FORWARD) if name in names and name in env}
    return forward if RULE in calls and calls & {CONV, CONV_FORWARD} else None


def unrecognized(model: nn.Module) -> bool:
    """Whether `model` has linear-attention layers (config `layer_types`) but no layer `install` would take: a
    transformers whose DeltaNet forward no longer calls the two globals by these names."""
    config = getattr(model, "config", None)
    layer_types = getattr(getattr(config, "get_text_config", lambda: config)(), "layer_types", None) or ()
    return "linear_attention" in layer_types and not any(_deltanet_forward(m) for m in model.modules())


def _shadow_module(env: dict) -> types.ModuleType:
    """A copy of the modeling module (globals `env`) with surogate's rule and convolution, registered in sys.modules
    under its own name: Dynamo resolves and guards a function's globals through the module its `__name__` names, so
    the copied forward's globals must be a module's. One per modeling module; transformers' own is left as it was."""
    name = f"{__name__}.shadow.{env['__name__']}"
    shadow = sys.modules.get(name)
    if shadow is None:
        shadow = types.ModuleType(name)
        vars(shadow).update(env)
        vars(shadow).update(_replacements(env))
        shadow.__name__ = name
        sys.modules[name] = shadow
    return shadow


def install(model: nn.Module, set_attribute: Callable[[nn.Module, str, object], None]) -> int:
    """Give each DeltaNet layer of `model` transformers' forward with surogate's rule and convolution in place of
    the module globals (module doc); `set_attribute(module, "forward", f)` records what it replaces (compile's
    undo). Returns the number of layers."""
    count = 0
    for module in model.modules():
        forward = _deltanet_forward(module)
        if forward is None:
            continue
        function = types.FunctionType(forward.__code__, vars(_shadow_module(forward.__globals__)), forward.__name__,
                                      forward.__defaults__, forward.__closure__)
        function.__kwdefaults__ = forward.__kwdefaults__
        set_attribute(module, "forward", types.MethodType(function, module))
        count += 1
    return count
