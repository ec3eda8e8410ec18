"""The `surogate` console script: `surogate train [CONFIG.yaml]`, `surogate merge BASE ADAPTER OUT` and
`surogate info [--arch sm_XX]`.

Heavy imports (torch, transformers) happen inside the subcommands, so `surogate --help` and
config errors answer at once. Errors a user can fix (bad config, missing file, a recipe the GPU
cannot run) print one line and exit with status 2; anything else is a bug and keeps its traceback.
Ctrl-C during training saves a checkpoint (surogate/training/train.py), then exits with status 130.

Under torchrun (`torchrun --nproc-per-node N -m surogate train cfg.yaml`) every rank runs `train`;
rank 0 prints the summary and the messages that every rank would print alike.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    import surogate

    p = argparse.ArgumentParser(prog="surogate", description="Fast LoRA/QLoRA fine-tuning in low precision.")
    p.add_argument("--version", action="version", version=f"surogate {surogate.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="fine-tune LoRA adapters from a YAML config (none: the embedded default)",
                       description="Fine-tune LoRA adapters. With no CONFIG, runs the embedded default: a tiny "
                                   "Qwen3 on the bundled GSM8K sample (no download). Keys: --print-config lists them "
                                   "with their defaults; docs/cli.md in the source explains them.")
    t.add_argument("config", nargs="?", default=None, help="YAML config file (default: the embedded default)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set max_steps=10 --set dataset.max_train_samples=50")
    t.add_argument("--output-dir", default=None, help="shorthand for --set output_dir=DIR")
    t.add_argument("--print-config", action="store_true", help="print the checked config as YAML and exit")

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base: one plain Hugging Face checkpoint",
                       description="Write BASE + ADAPTER as one Hugging Face model in OUT (merged in FP32, rounded "
                                   "once to --dtype); the tokenizer is copied along. Loads with from_pretrained, "
                                   "serves with vLLM.")
    m.add_argument("base", help="the base model: a local folder or a hub id (the one the adapter was trained on)")
    m.add_argument("adapter", help="an adapter folder (output_dir/adapter or output_dir/checkpoint-<step>)")
    m.add_argument("out", help="the folder to write (new, or empty)")
    m.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),  # adapters.MERGE_DTYPES
                   help="dtype of the merged weights (default bfloat16)")
    m.add_argument("--trust-remote-code", action="store_true",
                   help="load a BASE that ships its own modeling code (runs its Python files)")

    i = sub.add_parser("info", help="what surogate runs on this machine or on a given GPU architecture")
    i.add_argument("--arch", default=None, help="an architecture such as sm_90 or sm_120 (default: this GPU)")
    i.add_argument("--no-sass", action="store_true",
                   help="skip building the kernels and checking their SASS (instant; recipes table only)")
    return p


def _rank() -> int:
    """This process's rank under torchrun (0 without it): what decides who prints the job's lines."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def _info(arch: str | None, check_sass: bool = True) -> str:
    """The text of `surogate info`: `surogate.training.info.render` (imported here: it pulls in Triton)."""
    from surogate.training.info import render

    return render(arch=arch) if check_sass else render(arch=arch, check_sass=False)


def _quiet_libraries() -> None:
    """Keep the progress lines readable: no HF progress bars, no Hub fetch by bitsandbytes on import
    (surogate.compat.import_bitsandbytes_offline; PEFT's deprecation noise is silenced where surogate calls it:
    surogate.compat.quiet_peft_deprecations)."""
    from transformers.utils import logging as hf_logging

    from surogate.compat import import_bitsandbytes_offline

    hf_logging.disable_progress_bar()
    import_bitsandbytes_offline()


def _merge(args: argparse.Namespace) -> int:
    """`surogate merge`: paths checked first (one-line errors), then `surogate.training.adapters.merge`."""
    from pathlib import Path

    from surogate.training.adapters import ADAPTER_CONFIG
    from surogate.training.config import ConfigError, check_model_name
    from surogate.training.train_checks import model_config

    adapter, out = Path(args.adapter).expanduser(), Path(args.out).expanduser()
    if not (adapter / ADAPTER_CONFIG).is_file():
        what = "does not exist" if not adapter.exists() else f"holds no {ADAPTER_CONFIG}"
        raise ConfigError(f"ADAPTER: {args.adapter!r} {what}; give the adapter folder a run wrote "
                          "(output_dir/adapter or output_dir/checkpoint-<step>)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"OUT: {args.out!r} exists and is {'a file' if not out.is_dir() else 'not empty'}; "
                          "name a new folder")
    check_model_name("BASE", args.base, allow_default=False)  # a missing folder, or a mistyped one
    model_config(args.base, key="BASE", trust_remote_code=args.trust_remote_code)  # unreadable, or not on the hub
    _quiet_libraries()
    from surogate.training.adapters import merge

    written = merge(args.base, adapter, out, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(f"merged: {written}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from surogate.training.config import load_config

    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)  # every key checked before any work
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    _quiet_libraries()
    from surogate.training.train import train

    result = train(cfg)
    if result.rank == 0:
        print(result.summary())
    return 0


def _error(e: Exception, status: int) -> int:
    """One line on rank 0 (the other ranks' errors print with their rank: distributed.fail_fast); the status."""
    if _rank() == 0:
        print(f"surogate: error: {e}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `surogate` console script; returns the exit status (130 on Ctrl-C, whenever it comes:
    during the first seconds' imports too, which gave a traceback)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        if _rank() == 0:
            print("surogate: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    from surogate.compat import DependencyError, check_dependencies

    try:
        check_dependencies()  # before the imports below: they would fail on what it names
    except DependencyError as e:
        return _error(e, 2)
    from surogate.recipes import RecipeNotSupportedError
    from surogate.training.checkpoint import CheckpointWriteError
    from surogate.training.config import ConfigError

    try:
        if args.command == "merge":
            return _merge(args)
        if args.command == "info":
            try:
                print(_info(args.arch, check_sass=not args.no_sass), end="")
            except ValueError as e:  # an --arch that is not an architecture
                raise ConfigError(f"--arch: {e}") from None
            return 0
        return _train(args)
    except (ConfigError, RecipeNotSupportedError, FileNotFoundError) as e:
        return _error(e, 2)
    except FloatingPointError as e:  # a NaN / Inf loss (train.non_finite_loss_message): the run stopped
        return _error(e, 1)
    except CheckpointWriteError as e:  # a full disk while saving: the earlier checkpoints stay
        return _error(e, 1)


if __name__ == "__main__":
    sys.exit(main())
