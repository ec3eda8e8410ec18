"""Probe: which way of driving a tiny compiled model trips Inductor's can_fuse assertion (run on the GPU)."""
import sys, importlib.util, traceback
sys.path.insert(0, "tests")
import torch, surogate
from surogate.graphed_step import GraphedStep
spec = importlib.util.spec_from_file_location("g", "tests/gpu/test_real_data_gpu.py"); g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)


def direct(m, b):
    m(**b).loss.backward()


def side_stream(m, b):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        (m(**b).loss * 0.5).backward()
    torch.cuda.synchronize()


def graphed(m, b):
    GraphedStep(m, loss_scale=0.5, strict=True, pad_to=1)(**b)


def graphed_twin_first(m, b):
    GraphedStep(m, loss_scale=0.5, strict=True)(**b)


for fn in (direct, side_stream, graphed, graphed_twin_first):
    torch._dynamo.reset()
    try:
        m, twin = g._pair("llama")
        ids = torch.randint(1, 120, (2, 128), device="cuda")
        fn(m, {"input_ids": ids, "labels": ids})
        print("OK", fn.__name__, flush=True)
    except Exception as e:
        print("FAIL", fn.__name__, type(e).__name__, str(e).splitlines()[0][:200], flush=True)
        tb = traceback.format_exc().splitlines()
        print("\n".join(l for l in tb if "surogate" in l or "torch/_inductor" in l or "torch/_dynamo" in l)[-3000:])
