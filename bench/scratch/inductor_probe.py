"""Probe: which tiny configs / lengths trip Inductor's can_fuse assertion (run on the GPU)."""
import sys, os, importlib.util, traceback
sys.path.insert(0, "tests")
import torch, transformers as T, surogate
from surogate.compiler import _attach_lora
spec = importlib.util.spec_from_file_location("g", "tests/gpu/test_real_data_gpu.py"); g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)
from tiny_qwen3 import cuda_lora_qwen3
cases = [("qwen3_ref", None, 128), ("llama", {}, 96), ("llama", {}, 128), ("llama", {"num_key_value_heads": 4}, 128), ("qwen3", {}, 128)]
for name, over, S in cases:
    torch._dynamo.reset()
    try:
        if over is None:
            m = surogate.compile(cuda_lora_qwen3(), recipe="bf16")
        else:
            m, _ = g._pair(name, **over)
        ids = torch.randint(1, 120, (2, S), device="cuda")
        for _ in range(2):
            m(input_ids=ids, labels=ids).loss.backward()
        print("OK", name, over, S, flush=True)
    except Exception as e:
        print("FAIL", name, over, S, type(e).__name__, str(e).splitlines()[0][:200], flush=True)
