"""The `surogate` console script: `surogate train [CONFIG.yaml]` and `surogate info [--arch sm_XX]`.

Heavy imports (torch, transformers) happen inside the subcommands, so `surogate --help` and
config errors answer at once. Errors a user can fix (bad config, missing file, a recipe the GPU
cannot run) print one line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
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
                                   "Qwen3 on the bundled GSM8K sample (no download). Keys: docs/cli.md.")
    t.add_argument("config", nargs="?", default=None, help="YAML config file (default: the embedded default)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set max_steps=10 --set dataset.max_train_samples=50")
    t.add_argument("--output-dir", default=None, help="shorthand for --set output_dir=DIR")
    t.add_argument("--print-config", action="store_true", help="print the checked config as YAML and exit")

    i = sub.add_parser("info", help="what surogate runs on this machine or on a given GPU architecture")
    i.add_argument("--arch", default=None, help="an architecture such as sm_90 or sm_120 (default: this GPU)")
    i.add_argument("--no-sass", action="store_true",
                   help="skip building the kernels and checking their SASS (instant; recipes table only)")
    return p


def _info(arch: str | None, check_sass: bool = True) -> str:
    """The text of `surogate info`: `surogate.info.render` (imported here: it pulls in Triton)."""
    from surogate.info import render

    return render(arch=arch) if check_sass else render(arch=arch, check_sass=False)


def _quiet_libraries() -> None:
    """Keep the progress lines readable: no HF progress bars, no PEFT-on-transformers deprecation noise."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


def _train(args: argparse.Namespace) -> int:
    from surogate.config import load_config

    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)  # every key checked before any work
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    _quiet_libraries()
    from surogate.train import train

    result = train(cfg)
    print(result.summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `surogate` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    from surogate.config import ConfigError
    from surogate.recipes import RecipeNotSupportedError

    try:
        if args.command == "info":
            try:
                print(_info(args.arch, check_sass=not args.no_sass), end="")
            except ValueError as e:  # an --arch that is not an architecture
                raise ConfigError(f"--arch: {e}") from None
            return 0
        return _train(args)
    except (ConfigError, RecipeNotSupportedError, FileNotFoundError) as e:
        print(f"surogate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("surogate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
