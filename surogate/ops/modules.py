"""`SurogateLinear`: the frozen, possibly quantized base layer swapped into PEFT's `base_layer`.

Why a module and not a graph rewrite: the quantized weight must exist (and the bf16 copy be
freed) before capture, so that Dynamo sees the weight list as ordinary buffers and the
compiled graph never holds the bf16 weight of a q-recipe. Its forward is one
`surogate::lora_linear` call without LoRA, so eager runs are correct on their own and the
match pass reads the weight format straight from the graph.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from surogate.recipes import Compute, Recipe, get


class SurogateLinear(nn.Module):
    """A frozen linear `y = Q(x) @ W.T + b` whose weight is held as the recipe says.

    Buffers `w0..wn` hold the list of `surogate.ops.prepare_weight(W, recipe.weight_format)`.
    Recipes that keep the bf16 weight (bf16, fp8, fp4) also keep `weight` as a frozen parameter
    (for merging and export); q-recipes drop it and `weight` is None.

    Packed (`surogate.weight_packing`): linears that share their input (q/k/v, gate/up) can hold ONE set of
    parts, their weights concatenated along N, registered in every member; each member reads its own
    rows (`_rows`) as views, and the fused GEMM of horizontal fusion reads the whole buffer.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, recipe: "str | Recipe",
                 device: "torch.device | None" = None) -> None:
        super().__init__()
        from surogate import ops

        recipe = get(recipe)
        if weight.dim() != 2:
            raise ValueError(f"SurogateLinear takes a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight_format = recipe.weight_format.value
        self.forward_precision = recipe.forward.value
        self.grad_input_precision = recipe.grad_input.value
        weight = weight.detach().to(device)  # device: where it runs, when compile moves a CPU model there
        bias = None if bias is None else bias.to(device)
        parts = ops.prepare_weight(weight, self.weight_format)
        self._n_parts = len(parts)
        self._part_dtypes = tuple(part.dtype for part in parts)
        for i, part in enumerate(parts):
            self.register_buffer(f"w{i}", part, persistent=False)
        self.weight = nn.Parameter(weight, requires_grad=False) if recipe.keeps_bf16_weight else None
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._rows: tuple[tuple[int, int], ...] | None = None  # this layer's rows of each part, when packed

    @classmethod
    def from_linear(cls, module: nn.Module, recipe: "str | Recipe",
                    device: "torch.device | None" = None) -> "SurogateLinear":
        """Build from an `nn.Linear` or a GPT-2 style `Conv1D` (weight stored (in, out): transposed here),
        on `device` when given."""
        weight = module.weight
        if type(module).__name__ == "Conv1D":
            weight = weight.t().contiguous()
        elif not isinstance(module, nn.Linear):
            raise TypeError(f"cannot turn {type(module).__name__} into a SurogateLinear; expected nn.Linear or Conv1D")
        return cls(weight, getattr(module, "bias", None), recipe, device)

    def weight_list(self) -> list[Tensor]:
        # surogate.distributed may hold an integer part as a float view of the same bytes (FSDP2 before
        # torch 2.13 shards only floating-point parameters); the op always gets the stored dtype.
        parts = [getattr(self, f"w{i}") for i in range(self._n_parts)]
        parts = [p if p.dtype == d else p.view(d) for p, d in zip(parts, self._part_dtypes)]
        if self._rows is None:
            return parts
        return [p[start:stop] for p, (start, stop) in zip(parts, self._rows)]

    def pack(self, parts: list[Tensor], rows: tuple[tuple[int, int], ...]) -> None:
        """Hold `parts` (a group's packed weight, shared with the other members) and read `rows` of each.
        A kept bf16 `weight` becomes a view of the packed rows, so nothing is stored twice."""
        if self._rows is not None:
            raise RuntimeError("this layer is packed already; unpack() it first")
        for i, part in enumerate(parts):
            setattr(self, f"w{i}", part)
        self._rows = tuple(rows)
        if self.weight is not None and self.weight_format == "bf16":
            self.weight = nn.Parameter(self.weight_list()[0], requires_grad=False)

    def unpack(self) -> None:
        """Own contiguous copies of this layer's rows again (FSDP shards each member's parts on its own)."""
        if self._rows is None:
            return
        own = [p.clone() for p in self.weight_list()]  # a view would keep the whole packed buffer alive
        self._rows = None
        for i, part in enumerate(own):
            setattr(self, f"w{i}", part)
        if self.weight is not None and self.weight_format == "bf16":
            self.weight = nn.Parameter(own[0], requires_grad=False)

    def forward(self, input: Tensor) -> Tensor:
        from surogate import ops

        return ops.lora_linear(input, self.weight_list(), self.weight_format, None, None, None, self.bias, 1.0,
                               self.forward_precision, self.grad_input_precision)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """The base weight (N, K) as the GEMMs see it: exact for bf16 recipes, dequantized for q-recipes."""
        if self.weight is not None:
            return self.weight.to(dtype)
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.w0.device)
        from surogate import ops

        # One GEMM against the identity dequantizes through the op itself, whatever the format.
        out = ops.lora_linear(eye, self.weight_list(), self.weight_format, forward=Compute.BF16, grad_input=Compute.BF16)
        return out.t().contiguous().to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight_format={self.weight_format}, forward={self.forward_precision}")


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """Trainable (LoRA) and frozen (base) parameters; a quantized base counts its weights' elements, and
    `frozen_bytes` is the memory the frozen base takes as stored (e.g. FP8 or NF4 plus their scales).
    `trainable_other`: trainable parameters that are not LoRA factors (a classification head PEFT trains whole)."""

    trainable: int
    frozen: int
    frozen_bytes: int
    recipe: str | None = None
    trainable_other: int = 0

    def __str__(self) -> str:
        how = f" ({self.recipe})" if self.recipe else ""
        what = (f"LoRA {_human_count(self.trainable - self.trainable_other)} + "
                f"{_human_count(self.trainable_other)} other" if self.trainable_other else "LoRA")
        return (f"trainable {_human_count(self.trainable)} params ({what}), frozen {_human_count(self.frozen)} params "
                f"stored in {_human_bytes(self.frozen_bytes)}{how}")


def parameter_counts(model: nn.Module, recipe: str | None = None) -> ParameterCounts:
    """Count `model`'s parameters as users expect: trainable = those that train (the LoRA factors);
    frozen = the base's, quantized weights (SurogateLinear without a bf16 copy) by their element count."""
    trainable = frozen = frozen_bytes = other = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
            other += 0 if "lora_" in name else p.numel()
        else:
            frozen += p.numel()
            frozen_bytes += p.numel() * p.element_size()
    from surogate.ops.experts import EXPERT_PARAMETERS, SurogateExperts

    for module in model.modules():
        if isinstance(module, SurogateLinear):
            if module.weight is None or module.weight_format != "bf16":  # bf16: w0 is `weight`, counted above
                frozen_bytes += sum(t.numel() * t.element_size() for t in module.weight_list())
            if module.weight is None:
                frozen += module.in_features * module.out_features
        elif isinstance(module, SurogateExperts) and module.weight_format != "bf16":  # bf16: the parameters above
            for name in EXPERT_PARAMETERS:
                frozen_bytes += sum(t.numel() * t.element_size() for t in module.weight_list(name))
            frozen += 3 * module.num_experts * module.hidden_size * module.intermediate_size  # (E, 2I, H) + (E, H, I)
    return ParameterCounts(trainable, frozen, frozen_bytes, recipe, other)


def _human_count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.1f}{unit}"
    return str(n)


def _human_bytes(n: int) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e5:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"
