"""`SurogateExperts`: the frozen experts of a MoE block, held as the recipe says and run as two grouped ops.

transformers 5 keeps the experts of Qwen3-MoE, Mixtral, Qwen2-MoE (and the other models decorated with
`use_experts_implementation`) as two 3-D parameters, `gate_up_proj (E, 2I, H)` and `down_proj (E, H, I)`,
called as `experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))`. PEFT 0.21 adapts them
with `target_parameters`: nested `ParamWrapper`s whose forward adds `s * B_e A_e` to the whole weight
stack on every call. surogate swaps the innermost module (the HF experts) for `SurogateExperts` and
turns the outermost wrapper into `ExpertsLora`, whose forward hands PEFT's factors (as views, so the
gradients land in PEFT's own parameters and `save_pretrained` writes PEFT's adapter) to
`SurogateExperts.forward`: sort the (token, expert) pairs by expert, gate_up as one grouped op,
the gate, down as one grouped op, weight and sum back per token. Module, not graph rewrite, for the
reason `SurogateLinear` gives: the quantized stacks must exist, and the bf16 ones be freed, before
capture; and one forward then serves every `experts_implementation` the config may name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from surogate.kernels.variants import grouped_compute
from surogate.ops.grouped import grouped_lora_linear, prepare_expert_weights
from surogate.recipes import Recipe, WeightFormat, get

# (name of the 3-D parameter, what it computes) of the experts layouts surogate runs.
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def experts_weight_format(recipe: "str | Recipe") -> WeightFormat:
    """How a recipe stores the experts: q-recipes as their weight format (the bf16 stacks freed); the
    others keep bf16 experts (a cached FP8/FP4 copy beside the bf16 stack would only add memory: the
    grouped kernels' FP8 MMA reads block-scaled fp8 experts, which only qfp8 stores)."""
    recipe = get(recipe)
    return WeightFormat.BF16 if recipe.keeps_bf16_weight else recipe.weight_format


def unsupported_experts(module: nn.Module, weight_format: "WeightFormat | str | None" = None) -> str | None:
    """Why surogate cannot run this experts module (None when it can): the layouts of Qwen3-MoE,
    Mixtral and Qwen2-MoE (gate and up concatenated, (E, N, K) weights, no bias, the default gate), and
    the shapes `weight_format` can hold (NF4 experts: K of both GEMMs a multiple of 64)."""
    params = {name: getattr(module, name, None) for name in EXPERT_PARAMETERS}
    if not all(isinstance(p, Tensor) and p.dim() == 3 for p in params.values()):
        return "no 3-D gate_up_proj and down_proj parameters"
    for flag, wanted in (("has_gate", True), ("is_concatenated", True), ("is_transposed", False),
                         ("has_bias", False), ("has_post_expert_norm", False), ("_is_expert_parallel", False)):
        if getattr(module, flag, wanted) != wanted:
            return f"{flag}={not wanted} (surogate runs gate_up concatenated, untransposed, without bias)"
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None and gate.__name__ != "_default_apply_gate":
        return f"a custom gate ({type(module).__name__}._apply_gate)"
    if not hasattr(module, "act_fn") or not hasattr(module, "num_experts"):
        return "no act_fn / num_experts"
    e, n2, h = params["gate_up_proj"].shape
    if n2 % 2 or params["down_proj"].shape != (e, h, n2 // 2):
        return f"gate_up_proj {tuple(params['gate_up_proj'].shape)} and down_proj " \
               f"{tuple(params['down_proj'].shape)} are not (E, 2I, H) and (E, H, I)"
    if weight_format is not None and WeightFormat(weight_format) is WeightFormat.NF4 and (h % 64 or n2 // 2 % 64):
        return f"NF4 experts need hidden and expert sizes divisible by 64 (got {h} and {n2 // 2}); use qfp8"
    return None


class SurogateExperts(nn.Module):
    """The frozen experts `(E, 2I, H)` / `(E, H, I)` of one MoE block in the recipe's experts format.

    Buffers `gate_up_w0..` and `down_w0..` hold `prepare_expert_weights` of each stack. bf16-keeping
    recipes keep the stacks themselves as frozen parameters `gate_up_proj` / `down_proj` (the buffers
    are the same tensors); q-recipes drop them.
    """

    def __init__(self, experts: nn.Module, recipe: "str | Recipe", device: "torch.device | None" = None) -> None:
        super().__init__()
        self.weight_format = experts_weight_format(recipe).value
        why = unsupported_experts(experts, self.weight_format)
        if why:
            raise ValueError(f"surogate cannot run {type(experts).__name__}: {why}")
        self.num_experts = int(experts.num_experts)
        self.act_fn = experts.act_fn
        # qfp8: FP8 MMAs on the fp8_block experts; every other recipe: bf16 MMAs (dequantized in registers).
        self.compute = grouped_compute(get(recipe).forward, self.weight_format).value
        self.hidden_size, self.intermediate_size = experts.down_proj.shape[1], experts.down_proj.shape[2]
        self._n_parts = {}
        for name in EXPERT_PARAMETERS:
            stack = getattr(experts, name).detach().to(device)  # one stack on the GPU at a time when moving
            parts = prepare_expert_weights(stack, self.weight_format)
            self._n_parts[name] = len(parts)
            for i, part in enumerate(parts):
                self.register_buffer(f"{name}_w{i}", part, persistent=False)
            keep = self.weight_format == WeightFormat.BF16.value
            setattr(self, name, nn.Parameter(stack, requires_grad=False) if keep else None)

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
        gate_up = self._grouped(hidden_states, offsets, "gate_up_proj", lora, rows)
        gate, up = gate_up.chunk(2, dim=-1)
        # The routing weight scales the down projection's input rather than its output (the GEMM is linear in
        # each row): the backward then keeps the (T*k, I) input, not the (T*k, H) output, for the weight's
        # gradient: 84 MB less per layer on Qwen3-30B-A3B at 4096 tokens.
        weight = top_k_weights.reshape(-1)[order].unsqueeze(-1).to(gate.dtype)
        out = self._grouped(self.act_fn(gate) * up * weight, offsets, "down_proj", lora)
        unsorted = torch.empty_like(out).index_copy(0, order, out)
        return unsorted.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _grouped(self, x: Tensor, offsets: Tensor, name: str, lora: dict, rows: Tensor | None = None) -> Tensor:
        a, b, scale = lora.get(name, (None, None, 1.0))
        return grouped_lora_linear(x, offsets, self.weight_list(name), self.weight_format, a, b, scale, self.compute,
                                   rows)

    @torch.no_grad()
    def dequantize(self, name: str, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """The `(E, N, K)` stack `name` as the grouped GEMMs see it (exact for bf16, dequantized otherwise)."""
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
        return out.view(e, k, -1).transpose(1, 2).contiguous().to(dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"weight_format={self.weight_format}, compute={self.compute}")


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


def peft_expert_factors(wrapper: nn.Module, adapter: str) -> tuple[Tensor, Tensor, float]:
    """PEFT 0.21's factors of one targeted expert parameter as `(A (E, r, K), B (E, N, r), scale)` views.

    `lora_A.weight (r*E, K)` holds expert e's rows at `e*r:(e+1)*r` (expert-major); `lora_B.weight
    (N, r*E)` holds expert e's rank j at column `j*E + e` (rank-major); the delta of expert e is
    `scaling * B_e @ A_e` (PEFT's `ParamWrapper.get_delta_weight`; pinned by tests/test_moe.py).
    """
    a, b = lora_factors_from_peft(wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight,
                                  wrapper.num_experts)
    return a, b, wrapper.scaling[adapter]


def _lora_of(outer: nn.Module) -> dict[str, tuple[Tensor, Tensor, float]]:
    """The active adapter's factors of every wrapper in the nested chain, by parameter name."""
    from peft.tuners.lora.layer import ParamWrapper

    lora = {}
    layer = outer
    while isinstance(layer, ParamWrapper):
        if not layer.disable_adapters and not layer.merged:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    lora[layer.parameter_name] = peft_expert_factors(layer, adapter)
        layer = layer.base_layer
    return lora


def experts_lora_class(wrapper_class: type) -> type:
    """`ExpertsLora`: PEFT's `ParamWrapper` with a forward that runs the experts as grouped ops (the
    outermost wrapper's class is swapped for it; its parameters, keys and PEFT's save/load stay)."""

    class ExpertsLora(wrapper_class):
        def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
            return self.get_base_layer()(x, *args, lora=_lora_of(self), **kwargs)

    ExpertsLora.__qualname__ = ExpertsLora.__name__ = f"Surogate{wrapper_class.__name__}"
    return ExpertsLora
