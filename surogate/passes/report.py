"""`CompileReport`: what every pass rewrote, fused or left alone, and why.

Printed as `model.surogate_report`. A fallback is never silent: every target linear appears
once, with what it became or the reason it stayed as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LinearEntry:
    name: str  # e.g. "self_attn.q_proj" (relative to the compiled region)
    became: str  # e.g. "surogate::lora_linear[fp8_block, fwd=fp8, dgrad=fp8]" or "left as is"
    reason: str = ""  # why it fell back; empty when rewritten


@dataclass
class CompileReport:
    recipe: str = ""
    arch: str = ""
    backend: str = ""
    linears: dict[str, LinearEntry] = field(default_factory=dict)
    groups: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (what, member names)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (what, why)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # pass name -> how many changes (summed over graphs)
    graphs: int = 0  # FX graphs the backend was handed (one per compiled region shape/guard set)
    pending: str = ""  # why `linears` is not filled yet (Dynamo compiles at the first forward); "" once it is

    def rewrote(self, name: str, became: str) -> None:
        self.linears[name] = LinearEntry(name, became)

    def fell_back(self, name: str, reason: str, became: str = "left as is") -> None:
        self.linears[name] = LinearEntry(name, became, reason)
        if (name, reason) not in self.fallbacks:
            self.fallbacks.append((name, reason))

    def group(self, what: str, members: tuple[str, ...]) -> None:
        if (what, members) not in self.groups:
            self.groups.append((what, members))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def count(self, pass_name: str, n: int) -> None:
        self.counts[pass_name] = self.counts.get(pass_name, 0) + n

    @property
    def rewritten(self) -> list[str]:
        return [e.name for e in self.linears.values() if not e.reason]

    def __str__(self) -> str:
        rows = [f"surogate compile report: recipe {self.recipe} on {self.arch}, backend {self.backend}, "
                f"{self.graphs} graph(s)"]
        if self.pending and not self.linears:
            rows.append(self.pending)
        else:
            rows.append(f"linears ({len(self.rewritten)} rewritten of {len(self.linears)}):")
        for e in self.linears.values():
            rows.append(f"  {e.name:<40} -> {e.became}" + (f"   [fallback: {e.reason}]" if e.reason else ""))
        if self.groups:
            rows.append("fused groups:")
            rows += [f"  {what}: {', '.join(members)}" for what, members in self.groups]
        if self.fallbacks:
            rows.append("fallbacks:")
            rows += [f"  {what}: {why}" for what, why in self.fallbacks]
        if self.counts:
            rows.append("pass counts: " + ", ".join(f"{k}={v}" for k, v in self.counts.items()))
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)

    __repr__ = __str__
