"""What `pip install surogate` gets: the wheel built from this tree holds every file the package reads at run time
and nothing of tests/ or bench/, and installed away from the source tree it runs from its own copy (bundled data,
default config, default tokenizer) without writing into the package directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "surogate"


def _shipped_files() -> set[str]:
    """Every file of the package in the tree but developer notes (a README.md outside data/) and bytecode."""
    shipped = set()
    for path in PACKAGE.rglob("*"):
        rel = path.relative_to(ROOT)
        if not path.is_file() or "__pycache__" in rel.parts or path.suffix == ".pyc":
            continue
        if path.name == "README.md" and "data" not in rel.parts:
            continue
        shipped.add(rel.as_posix())
    return shipped


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the tree: an in-tree build/ left by an earlier build would ship its stale
    files, and the copy leaves no build/ or egg-info behind in the clone."""
    # --no-build-isolation (no network) builds with this environment's setuptools: the test extra asks for >= 77,
    # pyproject's build-system floor (license-files)
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(PACKAGE, src / "surogate", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in ROOT.iterdir():
        if path.is_file():
            shutil.copy2(path, src / path.name)
    out = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True, timeout=120)
    (built,) = out.glob("surogate-*.whl")
    return built


def test_wheel_holds_the_run_time_files_and_no_tests(wheel):
    import surogate

    names = set(zipfile.ZipFile(wheel).namelist())
    assert wheel.name.startswith(f"surogate-{surogate.__version__}-")
    missing = _shipped_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)} (pyproject's package-data)"
    assert {"surogate/data/default.yaml", "surogate/data/qwen3-tiny.json", "surogate/data/gsm8k/train.jsonl",
            "surogate/data/gsm8k/LICENSE"} <= names
    dist_info = f"surogate-{surogate.__version__}.dist-info/"
    stray = sorted(n for n in names if not n.startswith(("surogate/", dist_info)) or "__pycache__" in n
                   or n.endswith((".pyc", ".whl")))
    assert not stray, f"files outside the package in the wheel: {stray}"
    assert f"{dist_info}licenses/LICENSE" in names


# Run in the installed copy, from another folder: every write into the package directory is refused (as a
# read-only site-packages would), and the cache dir cannot be made (SUROGATE_CACHE_DIR is a file).
_SMOKE = r"""
import os, sys
site = os.path.realpath(sys.argv[1])

def refuse_writes(event, args):
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        writing = (args[1] is not None and any(c in args[1] for c in "wax+")) or (
            args[1] is None and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    else:
        writing = event in ("os.mkdir", "os.rename", "os.remove")
    if writing and os.path.realpath(os.fsdecode(args[0])).startswith(site + os.sep):
        raise PermissionError(f"{event} {args[0]}: a write into the installed package")

sys.addaudithook(refuse_writes)
import contextlib, io
import surogate
from surogate.training.cli import main
assert os.path.realpath(surogate.__file__).startswith(site + os.sep), surogate.__file__
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    main(["--version"])
assert out.getvalue().strip() == f"surogate {surogate.__version__}", out.getvalue()
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["train", "--print-config"]) == 0
from surogate.training.data import build_split
from surogate.training.setup import embedded_model_config
from surogate.training.tokenizer import load_tokenizer
tokenizer = load_tokenizer()
config = embedded_model_config(tokenizer)
split = build_split(None, "test", "gsm8k", tokenizer, seq_len=64, limit=8)
print("ok", len(tokenizer), config.vocab_size)
"""


def test_installed_wheel_runs_from_its_own_copy(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True, timeout=120)
    elsewhere = tmp_path / "user"
    elsewhere.mkdir()
    not_a_dir = tmp_path / "cache-is-a-file"
    not_a_dir.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), SUROGATE_CACHE_DIR=str(not_a_dir / "surogate"), PYTHONDONTWRITEBYTECODE="1",
               HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", _SMOKE, str(site)], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("ok 2048 ")
    assert not list(elsewhere.iterdir())
