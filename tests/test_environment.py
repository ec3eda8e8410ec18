"""What surogate asks of the environment it is imported into.

- The versions it requires, checked as installed (surogate.compat.check_dependencies): one line saying what to
  install, not a failure deep inside (transformers 4.x failed 75 tests, MoE models first).
- No network call on import: bitsandbytes (imported by PEFT) asks the Hugging Face Hub for a CPU kernel on import
  on CPUs with AVX512-BF16 (surogate.compat.import_bitsandbytes_offline says why that is refused). Each case runs in
  a fresh interpreter that counts `kernels.get_kernel` calls and makes bitsandbytes see AVX512-BF16 whatever this
  CPU has, so the control (bitsandbytes imported alone) shows the fetch on any machine.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from importlib import metadata

import pytest

from surogate import compat

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
    elif sys.argv[1] == "surogate-then-peft":  # a script's order: PEFT imports bitsandbytes before any compile
        import surogate
        import peft
        assert "bitsandbytes" in sys.modules and "surogate.compiler" not in sys.modules
    import bitsandbytes
    print("fetches:", calls)
''')


@pytest.mark.parametrize("first", ["bitsandbytes", "surogate", "surogate-then-peft"])
def test_importing_surogate_fetches_no_hub_kernel(first, tmp_path):
    pytest.importorskip("bitsandbytes")  # the test extra installs it
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


REQUIRES = ["torch>=2.11", 'triton>=3.6; platform_system == "Linux"', "transformers>=5.17", "peft>=0.21", "numpy",
            'pytest>=8; extra == "test"']


def _installed(monkeypatch, **versions):
    """surogate's metadata requires REQUIRES; `versions` are what is installed (others: not installed)."""
    def version(name):
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(metadata, "requires", lambda name: REQUIRES)
    monkeypatch.setattr(metadata, "version", version)


def test_an_old_transformers_is_one_line_saying_what_to_install(monkeypatch):
    _installed(monkeypatch, torch="2.13.0+cpu", triton="3.9.0", transformers="4.57.6", peft="0.21.2")
    with pytest.raises(compat.DependencyError) as refused:
        compat.check_dependencies.__wrapped__()
    assert str(refused.value) == ("surogate needs transformers>=5.17, found transformers 4.57.6: "
                                  "pip install -U 'transformers>=5.17'")


def test_nightlies_container_builds_and_what_is_only_for_the_tests_pass(monkeypatch):
    for torch in ("2.16.0.dev20261201+cu130", "2.11.0a0+ebedce2", "2.11.0+cu130"):  # a nightly, NGC's, a wheel's
        _installed(monkeypatch, torch=torch, triton="3.6.0", transformers="5.17.0", peft="0.21.0",
                   pytest="7.4.0")  # pytest is the test extra's: not checked; numpy: not installed, its import says so
        assert compat.check_dependencies.__wrapped__() is None
    _installed(monkeypatch, torch="2.10.0+cu128", triton="3.6.0", transformers="5.17.0", peft="0.21.0")
    with pytest.raises(compat.DependencyError, match=r"torch>=2.11, found torch 2.10.0\+cu128"):
        compat.check_dependencies.__wrapped__()


def test_surogate_run_from_a_source_tree_checks_nothing(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "requires", not_installed)
    assert compat.check_dependencies.__wrapped__() is None


def test_this_environment_meets_surogates_requirements():
    compat.check_dependencies.__wrapped__()


def test_the_cli_says_it_in_one_line_with_status_2(monkeypatch, capsys):
    from surogate.training import cli

    def refuse():
        raise compat.DependencyError("surogate needs transformers>=5.17, found transformers 4.57.6: "
                                     "pip install -U 'transformers>=5.17'")

    monkeypatch.setattr(compat, "check_dependencies", refuse)
    assert cli.main(["train", "--set", "max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert err == ("surogate: error: surogate needs transformers>=5.17, found transformers 4.57.6: "
                   "pip install -U 'transformers>=5.17'\n")
