"""FX graph passes: match LoRA linears, rewrite them into the fused op, fuse neighbours, report.

The pipeline is one explicit tuple, run in order on every graph Dynamo hands the surogate
backend. Each pass is `fn(gm, ctx) -> int` (how many things it changed) and writes what it did
or refused into `ctx.report`. Invariants every pass keeps: passes/README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from surogate.passes.horizontal import fuse_shared_input
from surogate.passes.match import LoraMatch, match_lora_linears
from surogate.passes.producer import fuse_producers
from surogate.passes.recompute import recompute_producers
from surogate.passes.report import CompileReport
from surogate.passes.rewrite import rewrite_lora_linears
from surogate.passes.save_fp8 import save_fp8_inputs
from surogate.passes.swiglu import use_swiglu_op
from surogate.recipes import Recipe, get

Pass = Callable[[fx.GraphModule, "PassContext"], int]

PIPELINE: tuple[tuple[str, Pass], ...] = (
    ("match", match_lora_linears),
    ("rewrite", rewrite_lora_linears),
    ("horizontal", fuse_shared_input),
    ("swiglu", use_swiglu_op),
    ("producer", fuse_producers),
    ("recompute", recompute_producers),
    ("save_fp8", save_fp8_inputs),
)


@dataclass
class PassContext:
    """What the passes share for one graph: the recipe, the arch, options and the report."""

    recipe: Recipe
    arch: str
    report: CompileReport = field(default_factory=CompileReport)
    options: dict[str, Any] = field(default_factory=dict)
    matches: list[LoraMatch] = field(default_factory=list)
    rewritten: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.recipe = get(self.recipe)


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, pipeline: tuple[tuple[str, Pass], ...] = PIPELINE) -> dict[str, int]:
    """Run `pipeline` on `gm` in place; returns {pass name: count} and adds the counts to the report."""
    counts = {}
    for name, fn in pipeline:
        counts[name] = fn(gm, ctx)
        ctx.report.count(name, counts[name])
    gm.graph.lint()
    gm.recompile()
    ctx.report.graphs += 1
    return counts


__all__ = ["PIPELINE", "CompileReport", "LoraMatch", "PassContext", "run_pipeline"]
