"""`SurogateExperts`: the frozen experts of a MoE block, held as the recipe says and run as two grouped ops.

transformers 5 keeps the experts of Qwen3-MoE, Mixtral, Qwen2-MoE, GPT-OSS, Llama 4 (and the other models
decorated with `use_experts_implementation`) as two 3-D parameters, `gate_up_proj` and `down_proj`, `(E, 2I, H)`
and `(E, H, I)` or transposed, `(E, H, 2I)` and `(E, I, H)` (GPT-OSS, Llama 4), called as `experts(hidden (T, H),
top_k_index (T, k), top_k_weights (T, k))` (Llama 4's block: routed_blocks.py). PEFT 0.21 adapts them with
`target_parameters`: nested `ParamWrapper`s whose forward adds `s * B_e A_e` to the whole weight stack on every
call. surogate swaps the innermost module (the HF experts) for `SurogateExperts` and turns the outermost wrapper
into `ExpertsLora`, whose forward hands PEFT's factors (as views, so the gradients land in PEFT's own parameters
and `save_pretrained` writes PEFT's adapter) to `SurogateExperts.forward`: sort the (token, expert) pairs by
expert, gate_up as one grouped op (plus the expert's bias), the gate, down as one grouped op (plus its bias),
weight and sum back per token. What differs between models around the two GEMMs (layout, biases, gate, where the
routing weight enters) is one `ExpertsLayout` (experts_layout.py). Module, not graph rewrite, for the reason
`SurogateLinear` gives: the quantized stacks must exist, and the bf16 ones be freed, before capture; and one
forward then serves every `experts_implementation` the config may name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from surogate.kernels.variants import grouped_compute
from surogate.ops.experts_layout import ExpertsLayout, Routing, experts_layout
from surogate.ops.grouped import grouped_lora_linear, prepare_expert_weights
from surogate.recipes import Recipe, WeightFormat, get

# The 3-D parameters of an experts module, gate_up first; an expert bias is `<name>_bias` (GPT-OSS).
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def experts_weight_format(recipe: "str | Recipe") -> WeightFormat:
    """How a recipe stores the experts: q-recipes as their weight format (the bf16 stacks freed); the
    others keep bf16 experts (a cached FP8/FP4 copy beside the bf16 stack would only add memory: the
    grouped kernels' FP8 MMA reads block-scaled fp8 experts, which only qfp8 stores)."""
    recipe = get(recipe)
    return WeightFormat.BF16 if recipe.keeps_bf16_weight else recipe.weight_format


def unsupported_experts(module: nn.Module, weight_format: "WeightFormat | str | None" = None) -> str | None:
    """Why surogate cannot run this experts module (None when it can): a layout `experts_layout` has no entry
    for, stacks that are not `(E, 2I, H)` and `(E, H, I)` (transposed: `(E, H, 2I)` and `(E, I, H)`), biases that
    are not `(E, 2I)` and `(E, H)`, or shapes `weight_format` cannot hold (NF4: hidden and expert sizes multiples
    of 64)."""
    params = {name: getattr(module, name, None) for name in EXPERT_PARAMETERS}
    if not all(isinstance(p, Tensor) and p.dim() == 3 for p in params.values()):
        return "no 3-D gate_up_proj and down_proj parameters"
    layout = experts_layout(module)
    if isinstance(layout, str):
        return layout
    if not hasattr(module, "num_experts"):
        return "no num_experts"
    gate_up, down = (_layout_view(params[name], layout) for name in EXPERT_PARAMETERS)
    e, n2, h = gate_up.shape
    if n2 % 2 or down.shape != (e, h, n2 // 2):
        want = "(E, H, 2I) and (E, I, H)" if layout.transposed else "(E, 2I, H) and (E, H, I)"
        return f"gate_up_proj {tuple(params['gate_up_proj'].shape)} and down_proj " \
               f"{tuple(params['down_proj'].shape)} are not {want}"
    if layout.bias:
        biases = {name: getattr(module, f"{name}_bias", None) for name in EXPERT_PARAMETERS}
        if not all(isinstance(b, Tensor) for b in biases.values()) \
                or biases["gate_up_proj"].shape != (e, n2) or biases["down_proj"].shape != (e, h):
            return f"has_bias=True without gate_up_proj_bias ({e}, {n2}) and down_proj_bias ({e}, {h})"
    if weight_format is not None and WeightFormat(weight_format) is WeightFormat.NF4 and (h % 64 or n2 // 2 % 64):
        return f"NF4 experts need hidden and expert sizes divisible by 64 (got {h} and {n2 // 2}); use qfp8"
    return None


def _layout_view(stack: Tensor, layout: ExpertsLayout) -> Tensor:
    """A 3-D stack seen in the other layout: the model's as the grouped op's `(E, N, K)`, or back. A transposed
    view where the model stores `(E, K, N)` (the transpose is its own inverse), else the stack itself."""
    return stack.transpose(1, 2) if layout.transposed else stack


class SurogateExperts(nn.Module):
    """The frozen experts of one MoE block in the recipe's experts format, laid out `(E, N, K)` for the grouped op.

    Buffers `gate_up_w0..` and `down_w0..` hold `prepare_expert_weights` of each stack, `(E, 2I, H)` and
    `(E, H, I)` (a transposed layout, GPT-OSS's and Llama 4's `(E, H, 2I)` / `(E, I, H)`, is copied into these
    once). bf16-keeping recipes keep the stacks as frozen parameters `gate_up_proj` / `down_proj` in the model's
    own layout (the buffers' tensors, or transposed views of them), so PEFT's merge writes into what the grouped op
    reads; q-recipes drop them. Expert biases (GPT-OSS) stay the module's own parameters `gate_up_proj_bias` /
    `down_proj_bias`, bf16 in every recipe and frozen unless they came trainable.
    """

    def __init__(self, experts: nn.Module, recipe: "str | Recipe", device: "torch.device | None" = None) -> None:
        super().__init__()
        self.weight_format = experts_weight_format(recipe).value
        why = unsupported_experts(experts, self.weight_format)
        if why:
            raise ValueError(f"surogate cannot run {type(experts).__name__}: {why}")
        self.layout: ExpertsLayout = experts_layout(experts)
        self.num_experts = int(experts.num_experts)
        self.act_fn = getattr(experts, "act_fn", None)  # the clamped gate (GPT-OSS) has its own
        # qfp8: FP8 MMAs on the fp8_block experts; every other recipe: bf16 MMAs (dequantized in registers).
        self.compute = grouped_compute(get(recipe).forward, self.weight_format).value
        self._n_parts = {}
        for name in EXPERT_PARAMETERS:
            stack = getattr(experts, name).detach().to(device)  # one stack on the GPU at a time when moving
            stack = _layout_view(stack, self.layout).contiguous()  # a copy only where transposed
            parts = prepare_expert_weights(stack, self.weight_format)
            self._n_parts[name] = len(parts)
            for i, part in enumerate(parts):
                self.register_buffer(f"{name}_w{i}", part, persistent=False)
            keep = self.weight_format == WeightFormat.BF16.value
            setattr(self, name, nn.Parameter(_layout_view(stack, self.layout), requires_grad=False) if keep else None)
            bias = getattr(experts, f"{name}_bias") if self.layout.bias else None
            if bias is not None and device is not None:
                bias = nn.Parameter(bias.detach().to(device), requires_grad=bias.requires_grad)
            setattr(self, f"{name}_bias", bias)
            if name == "down_proj":
                self.hidden_size, self.intermediate_size = stack.shape[1], stack.shape[2]

    def weight_list(self, name: str) -> list[Tensor]:
        return [getattr(self, f"{name}_w{i}") for i in range(self._n_parts[name])]

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                lora: "dict[str, tuple[Tensor, Tensor, float]] | None" = None) -> Tensor:
        """HF's experts contract; `lora` maps a parameter name to its `(A (E, r, K), B (E, N, r), scale)`."""
        lora = lora or {}
        tokens, top_k = top_k_index.shape
        expert_ids = top_k_index.reshape(-1)
        sorted_ids, order = torch.sort(expert_ids, stable=True)
        # Group boundaries without a host sync (and so inside a CUDA graph): the first row of each expert.
        bounds = torch.arange(self.num_experts + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
        offsets = torch.searchsorted(sorted_ids, bounds, out_int32=True)
        rows = (order // top_k).to(torch.int32)  # the kernels read each token through the index: no (T*k, H) copy
        weight = top_k_weights.reshape(-1)[order].unsqueeze(-1).to(hidden_states.dtype)
        if self.layout.routing is Routing.INPUT:  # Llama 4: each pair's input is its token times the score
            gate_up = self._grouped(hidden_states[rows] * weight, offsets, "gate_up_proj", lora)
        else:
            gate_up = self._grouped(hidden_states, offsets, "gate_up_proj", lora, rows)
        if self.layout.bias:
            gate_up = gate_up + self.gate_up_proj_bias[sorted_ids]
        act = self.layout.apply_gate(gate_up, self.act_fn)
        # The routing weight scales the down projection's input rather than its output (the GEMM is linear in
        # each row; its bias is scaled apart): the backward then keeps the (T*k, I) input, not the (T*k, H)
        # output, for the weight's gradient: 84 MB less per layer on Qwen3-30B-A3B at 4096 tokens.
        scaled = self.layout.routing is Routing.OUTPUT
        out = self._grouped(act * weight if scaled else act, offsets, "down_proj", lora)
        if self.layout.bias:
            bias = self.down_proj_bias[sorted_ids]
            out = out + (bias * weight if scaled else bias)
        unsorted = torch.empty_like(out).index_copy(0, order, out)
        return unsorted.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _grouped(self, x: Tensor, offsets: Tensor, name: str, lora: dict, rows: Tensor | None = None) -> Tensor:
        a, b, scale = lora.get(name, (None, None, 1.0))
        return grouped_lora_linear(x, offsets, self.weight_list(name), self.weight_format, a, b, scale, self.compute,
                                   rows)

    @torch.no_grad()
    def dequantize(self, name: str, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """The stack `name` as the grouped GEMMs see it (exact for bf16, dequantized otherwise), in the layout of
        the experts module it replaced (`(E, N, K)`, or `(E, K, N)` where transposed)."""
        stack = getattr(self, name)
        if stack is not None:
            return stack.to(dtype)
        e = self.num_experts
        k = self.hidden_size if name == "gate_up_proj" else self.intermediate_size
        device = self.weight_list(name)[0].device
        # One grouped GEMM of every expert against the identity dequantizes through the op itself.
        eye = torch.eye(k, dtype=torch.bfloat16, device=device).repeat(e, 1)
        offsets = torch.arange(e + 1, device=device, dtype=torch.int32) * k
        out = grouped_lora_linear(eye, offsets, self.weight_list(name), self.weight_format)  # bf16 MMA: exact
        stack = out.view(e, k, -1).transpose(1, 2)  # (E, N, K)
        return _layout_view(stack, self.layout).contiguous().to(dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"weight_format={self.weight_format}, compute={self.compute}, layout={self.layout}")


def lora_factors_from_peft(lora_a_weight: torch.Tensor, lora_b_weight: torch.Tensor, num_experts: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `ParamWrapper` factors of a 3-D expert parameter -> `(A (E, r, K), B (E, N, r))`, views.

    PEFT 0.21 (`target_parameters`) keeps one `nn.Linear` pair for all experts: `lora_A.weight
    (r*E, K)` with expert e's rows at `e*r:(e+1)*r` (expert-major), and `lora_B.weight (N, r*E)`
    with expert e's rank j at column `j*E + e` (rank-major). Its delta for expert e is
    `scaling * B_e @ A_e` (`ParamWrapper.get_delta_factors`); tests/test_kernels_grouped.py pins this
    against a PEFT-wrapped Qwen3-MoE block.
    """
    rk, k = lora_a_weight.shape
    n = lora_b_weight.shape[0]
    if rk % num_experts or lora_b_weight.shape[1] != rk:
        raise ValueError(f"PEFT expert factors are lora_A (r*E, K) and lora_B (N, r*E) with E={num_experts}; "
                         f"got {tuple(lora_a_weight.shape)} and {tuple(lora_b_weight.shape)}")
    a = lora_a_weight.reshape(num_experts, rk // num_experts, k)
    b = lora_b_weight.reshape(n, rk // num_experts, num_experts).permute(2, 0, 1)
    return a, b


def peft_expert_factors(wrapper: nn.Module, adapter: str, transposed: bool = False) -> tuple[Tensor, Tensor, float]:
    """PEFT 0.21's factors of one targeted expert parameter as the grouped op's `(A (E, r, K), B (E, N, r), scale)`
    views, for a parameter stored `(E, N, K)` or, `transposed`, `(E, K, N)`.

    `lora_factors_from_peft` reads `lora_A.weight` and `lora_B.weight` as `(E, r, in)` and `(E, out, r)`, where
    PEFT takes (in, out) from the parameter's shape: dims (1, 2) when the experts module says `is_transposed`,
    else (2, 1) (`_did_swap_in_out_features`, `ParamWrapper.update_layer`). That is the GEMM's (K, N) unless PEFT's
    reading and the stored layout disagree: Llama 4 stores `(E, K, N)` without saying so, so PEFT's A is the
    grouped op's B transposed and its B the op's A transposed (the delta `s * B_e A_e` of the stored `W[e]` is
    `s * (A_e^T B_e^T)` of the GEMM's). Pinned against PEFT by tests/test_moe_layouts.py.
    """
    a, b = lora_factors_from_peft(wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight,
                                  wrapper.num_experts)
    if wrapper._did_swap_in_out_features == transposed:
        a, b = b.transpose(1, 2), a.transpose(1, 2)
    return a, b, wrapper.scaling[adapter]


def _lora_of(outer: nn.Module, transposed: bool) -> dict[str, tuple[Tensor, Tensor, float]]:
    """The active adapter's factors of every wrapper in the nested chain, by parameter name."""
    from peft.tuners.lora.layer import ParamWrapper

    lora = {}
    layer = outer
    while isinstance(layer, ParamWrapper):
        if not layer.disable_adapters and not layer.merged:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    lora[layer.parameter_name] = peft_expert_factors(layer, adapter, transposed)
        layer = layer.base_layer
    return lora


def experts_lora_class(wrapper_class: type) -> type:
    """`ExpertsLora`: PEFT's `ParamWrapper` with a forward that runs the experts as grouped ops (the
    outermost wrapper's class is swapped for it; its parameters, keys and PEFT's save/load stay)."""

    class ExpertsLora(wrapper_class):
        def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
            experts = self.get_base_layer()
            return experts(x, *args, lora=_lora_of(self, experts.layout.transposed), **kwargs)

    ExpertsLora.__qualname__ = ExpertsLora.__name__ = f"Surogate{wrapper_class.__name__}"
    return ExpertsLora
