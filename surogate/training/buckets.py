"""Shape buckets chosen from the data: the lengths GraphedStep pads padded batches to.

GraphedStep captures one CUDA graph per bucket. Without buckets it rounds every length up to a multiple of
`pad_to` (128): on short examples that is much of the compute (the bundled GSM8K sample, 62-484 tokens, batches of
8 grouped by length: 27% of the tokens computed are padding, 6-11% of which is the examples' own). A trainer knows
the widths of an epoch's batches before the first step (each batch's longest row), so `choose` picks at most
`most` lengths, multiples of `align`, that pad those widths least: a one-dimensional partition, solved exactly by
dynamic programming over the distinct widths. A width past the largest bucket (another epoch's order) falls back
to the multiple of `pad_to`.

A bucket is not free: its first batch compiles, tunes and captures a graph for the new length. On the H200 that
cost ~30 micro-batches of the run's mean width (Qwen3-8B fp8, 3.5 s a bucket) to ~200 (Llama-3.2-1B, 4 s; Gemma-2-2B
more), bench/NOTES.md runs 146, 151-152. So when the trainer says how many epochs the run has (`runs`), `choose`
takes only the buckets that save more padding over the run than `bucket_cost` (BUCKET_COST) micro-batches each:
a short fine-tune on a small dataset gets a few, a long one up to `most`.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence

MOST = 12  # buckets chosen: GraphedStep's max_graphs (16) leaves room for shapes the data did not show
ALIGN = 16  # bucket lengths are multiples of this (GEMM rows, attention tiles)
BUCKET_COST = 100  # micro-batches of the mean width one more bucket costs (compile, tuning, capture): see above
_CANDIDATES = 256  # distinct widths the search takes at most (coarser alignment beyond: O(most x candidates^2))


def choose(widths: Sequence[int], most: int = MOST, align: int = ALIGN, limit: int | None = None,
           runs: float | None = None, bucket_cost: float = BUCKET_COST) -> tuple[int, ...]:
    """At most `most` bucket lengths (ascending, multiples of `align`, none past `limit` but a width itself)
    minimising the padding `widths` (one per batch, equal rows each) get when each is padded to the smallest
    bucket it fits. With `runs` (how many times the run meets these batches: its epochs), the number of buckets
    minimises the run's padding plus `bucket_cost` batches of the mean width for each bucket; without, every
    bucket up to `most` that cuts the padding is taken."""
    if most < 1 or align < 1:
        raise ValueError(f"most and align must be >= 1, got {most} and {align}")
    if runs is not None and (runs <= 0 or bucket_cost < 0):
        raise ValueError(f"runs must be > 0 and bucket_cost >= 0, got {runs} and {bucket_cost}")
    if not widths:
        return ()
    counts = Counter(padded_length(w, (), align, limit) for w in widths)  # each width on the grid of `align`
    while len(counts) > _CANDIDATES:  # very long rows: a coarser grid keeps the search quick
        align *= 2
        counts = Counter(padded_length(w, (), align, limit) for w in widths)
    values = sorted(counts)
    k = len(values)
    n_below, sum_below = [0], [0]  # prefix sums: batches, and their widths, below each value
    for v in values:
        n_below.append(n_below[-1] + counts[v])
        sum_below.append(sum_below[-1] + counts[v] * v)

    def cost(i: int, j: int) -> int:
        """Padding of the widths values[i..j] padded to values[j] (per row)."""
        return values[j] * (n_below[j + 1] - n_below[i]) - (sum_below[j + 1] - sum_below[i])

    groups = min(most, k)
    best = [cost(0, j) for j in range(k)]  # best[j]: one bucket ends at values[j], covering values[0..j]
    back: list[list[int]] = [[-1] * k]
    padding = [best[-1]]  # padding[g - 1]: the least padding with at most g buckets
    for _ in range(1, groups):
        nxt, arg = list(best), [-2] * k  # -2: no bucket added at this layer (fewer buckets stay allowed)
        for j in range(k):
            for i in range(j):
                c = best[i] + cost(i + 1, j)
                if c < nxt[j]:
                    nxt[j], arg[j] = c, i
        best = nxt
        back.append(arg)
        padding.append(best[-1])
    if runs is not None:  # the count whose padding over the run plus the buckets' own cost is least
        per_bucket = bucket_cost * sum_below[-1] / n_below[-1]
        groups = min(range(1, groups + 1), key=lambda g: runs * padding[g - 1] + g * per_bucket)
    chosen, j = [], k - 1
    for layer in reversed(back[:groups]):
        if j < 0:
            break
        if layer[j] == -2:  # this layer added no bucket at j
            continue
        chosen.append(values[j])
        j = layer[j]
    return tuple(sorted(chosen))


def padded_length(width: int, buckets: Sequence[int], pad_to: int = 1, limit: int | None = None) -> int:
    """The length a batch of `width` is padded to: the smallest bucket it fits, else `width` rounded up to a
    multiple of `pad_to` (no padding past `limit`, e.g. a model's positions)."""
    if buckets and width <= buckets[-1]:
        return buckets[bisect.bisect_left(buckets, width)]
    if pad_to <= 1:
        return width
    padded = -(-width // pad_to) * pad_to
    return width if limit is not None and padded > limit else padded
