"""Importing surogate makes no network call: bitsandbytes (imported by PEFT) asks the Hugging Face Hub for a CPU
kernel on import on CPUs with AVX512-BF16 (surogate.compat.import_bitsandbytes_offline says why that is refused).

Each case runs in a fresh interpreter that counts `kernels.get_kernel` calls and makes bitsandbytes see
AVX512-BF16 whatever this CPU has, so the control (bitsandbytes imported alone) shows the fetch on any machine."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("bitsandbytes")

PROBE = textwrap.dedent('''
    import importlib.abc, importlib.machinery, sys, types

    calls = []
    try:
        import kernels
    except ImportError:  # the fetch then fails on the import; a stand-in keeps the count
        kernels = types.ModuleType("kernels")
        kernels.__spec__ = importlib.machinery.ModuleSpec("kernels", None)
        sys.modules["kernels"] = kernels

    def get_kernel(repo_id, *args, **kwargs):
        calls.append(repo_id)
        raise RuntimeError("no network in this test")

    kernels.get_kernel = get_kernel

    class SeeAvx512Bf16(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "bitsandbytes.functional":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.has_avx512bf16 = lambda: True

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, SeeAvx512Bf16())
    if sys.argv[1] == "surogate":
        import surogate.compiler
        import peft
    import bitsandbytes
    print("fetches:", calls)
''')


@pytest.mark.parametrize("first", ["bitsandbytes", "surogate"])
def test_importing_surogate_fetches_no_hub_kernel(first, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = subprocess.run([sys.executable, str(probe), first], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    if first == "bitsandbytes":  # the control: bitsandbytes imported alone fetches, and warns offline
        assert "fetches: ['kernels-community/" in done.stdout
        assert "gemm_4bit_forward" in done.stderr
    else:
        assert "fetches: []" in done.stdout
        assert "gemm_4bit_forward" not in done.stderr
        assert "bitsandbytes" not in done.stderr
