"""Capture the torch-level FX graph Dynamo hands a backend, for tests and for looking at a model.

    gm, inputs = capture_graph(module, x)      # what the surogate passes will see
    print(gm.code)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx


def capture_graph(fn: Any, *args, dynamic: bool = False, **kwargs) -> tuple[fx.GraphModule, list]:
    """(graph module, example inputs) of the single graph Dynamo captures for `fn(*args, **kwargs)`.

    Raises when Dynamo breaks the function into several graphs (the passes then see each alone).
    """
    graphs: list[tuple[fx.GraphModule, list]] = []

    def backend(gm: fx.GraphModule, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)(*args, **kwargs)
    torch._dynamo.reset()
    return graphs[0]
