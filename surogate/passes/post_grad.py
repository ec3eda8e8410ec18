"""The passes that run inside Inductor, on the aten graphs AOTAutograd hands it (forward and backward), as one
`post_grad_custom_post_pass`: the SwiGLU backward's own gradient quantize wired to the dgrad (swiglu.py), the
quantize of a gradient no kernel produces left to the op (op_grad_quantize.py), then the cats built into their
slices (concat.py).
The torch-level passes (`run_pipeline`) ran before, on the graph Dynamo captured."""

from __future__ import annotations

from torch import fx

from surogate.passes import op_grad_quantize, concat, swiglu


def run(graph: fx.Graph) -> dict[str, int]:
    """The passes on `graph`, in order; {pass: how many things it rewrote}."""
    return {"swiglu": swiglu.quantize_in_swiglu_backward(graph),
            "swiglu_forward": swiglu.quantize_in_swiglu_forward(graph),
            "op_grad_quantize": op_grad_quantize.quantize_in_the_op(graph),
            "concat": concat.realize_cats_into_slices(graph)}


def post_grad_pass():
    """The passes as Inductor's `post_grad_custom_post_pass` (a CustomGraphPass: its uuid, the hash of the files
    that decide what it does, keys Inductor's FX-graph cache), chained before `previous` when the user set one;
    None when no pass would rewrite anything: the cats left to Inductor (`concat.ENABLED` off, bench/tps.py
    "+catmasked", or no `surogate::concat` lowering in this Inductor: `concat.lowered`) and the other two off."""
    if not swiglu.ENABLED and not op_grad_quantize.ENABLED and not (concat.ENABLED and concat.lowered()):
        return None
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    previous = config.post_grad_custom_post_pass

    class SurogatePostGrad(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            run(graph)
            if previous is not None:
                previous(graph)

        def uuid(self):
            if previous is not None and not hasattr(previous, "uuid"):
                return None  # a user's pass Inductor cannot key: it bypasses its cache, as it would without us
            files = (__file__, concat.__file__, swiglu.__file__, op_grad_quantize.__file__)
            switches = (concat.ENABLED, swiglu.ENABLED, swiglu.FORWARD_OP, swiglu.GEGLU, op_grad_quantize.ENABLED)
            return (get_hash_for_files(files), *switches,
                    previous.uuid() if previous is not None else None)

    return SurogatePostGrad()
