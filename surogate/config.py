"""The `surogate train` config: a YAML file read into dataclasses and checked before any work.

Every key is checked up front, so a typo, a bad value or a missing file fails in a second with
a message that names the key, not after the model has loaded. Relative paths are relative to
the current directory (as in other training CLIs). Keys and defaults: docs/cli.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEDULERS = ("linear", "cosine", "constant")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ConfigError(ValueError):
    """A config key is unknown, has a bad value, or names a file that does not exist."""


@dataclass
class DatasetConfig:
    """Where the examples are and how to read them."""

    path: str | None = None  # directory holding <split>.jsonl files; None: the bundled GSM8K sample
    format: str = "gsm8k"  # gsm8k: "question"/"answer" fields; text: a "text" field
    train_split: str = "train"
    eval_split: str | None = "test"  # None: no evaluation
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class TrainConfig:
    """One LoRA fine-tuning run. `model: default` is the embedded tiny Qwen3 (random weights)."""

    model: str = "default"  # "default", a local HF directory, or a hub id
    tokenizer: str | None = None  # None: the model's own, else the embedded default
    recipe: str = "bf16"
    arch: str | None = None  # None: the current GPU (or the CPU reference); "sm_90" etc.
    allow_emulation: bool = False
    sequence_len: int = 256
    sample_packing: bool = True
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int | None = None  # None: the train batch size
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    output_dir: str = "surogate-out"
    max_steps: int | None = None  # optimizer steps; wins over num_epochs
    num_epochs: float = 1.0
    seed: int = 42
    logging_steps: int = 1
    eval_steps: int | None = None  # None: evaluate at the end only
    cuda_graphs: str = "auto"  # "auto": capture the micro-step on CUDA with packed batches; "true"; "false"
    gradient_checkpointing: bool = False  # recompute each decoder block in the backward (less memory)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- value checkers: each returns the cleaned value or raises ConfigError naming the key ---------

def _int(key: str, v: Any, minimum: int | None = None, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key}: expected an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{key}: must be >= {minimum}, got {v}")
    return v


def _float(key: str, v: Any, minimum: float | None = None, maximum: float | None = None,
           optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{key}: expected a finite number, got {v!r}")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{key}: must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ConfigError(f"{key}: must be <= {maximum}, got {v}")
    return float(v)


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false, got {v!r}")
    return v


def _str(key: str, v: Any, optional: bool = False, choices: tuple[str, ...] | None = None) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key}: expected a non-empty string, got {v!r}")
    if choices is not None and v not in choices:
        raise ConfigError(f"{key}: {v!r} is not one of {', '.join(choices)}")
    return v


CUDA_GRAPH_MODES = ("auto", "true", "false")


def _cuda_graphs(key: str, v: Any) -> str:
    """YAML reads `true`/`false` as booleans; keep one string form."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return _str(key, v, choices=CUDA_GRAPH_MODES)


def _model(key: str, v: Any) -> str:
    v = _str(key, v)
    if v == "default":
        return v
    p = Path(v).expanduser()
    if p.exists() or not _HUB_ID.match(v) or v.startswith((".", "/", "~")):
        if not p.is_dir():
            raise ConfigError(f"{key}: {v!r} is not a directory; give a local Hugging Face model directory, "
                              "a hub id like 'Qwen/Qwen3-0.6B', or 'default' for the embedded tiny model")
        if not (p / "config.json").exists():
            raise ConfigError(f"{key}: {v!r} has no config.json; save the model there with save_pretrained()")
    return v


def _tokenizer(key: str, v: Any) -> str | None:
    v = _str(key, v, optional=True)
    if v is None or v == "default":
        return v
    p = Path(v).expanduser()
    if (p.exists() or v.startswith((".", "/", "~")) or not _HUB_ID.match(v)) and not p.is_dir():
        raise ConfigError(f"{key}: {v!r} is not a directory; give a local tokenizer directory, a hub id, "
                          "or 'default'")
    return v


def _recipe(key: str, v: Any) -> str:
    from surogate import recipes

    v = _str(key, v)
    try:
        return recipes.get(v).name
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _arch(key: str, v: Any) -> str | None:
    from surogate import recipes

    if v is None:
        return None
    try:
        return recipes.normalize_arch(v)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _targets(key: str, v: Any) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{key}: expected a non-empty list of module names like [q_proj, v_proj] "
                          f"(or 'all-linear'), got {v!r}")
    return list(v)


def _unknown(where: str, keys: set[str], valid: list[str]) -> None:
    for k in sorted(keys):
        close = difflib.get_close_matches(str(k), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
        raise ConfigError(f"unknown key {where}{k!r}{hint}")


def _dataset(raw: Any) -> DatasetConfig:
    if raw is None:
        return DatasetConfig()
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"dataset: expected a mapping with path/format/train_split/eval_split, got {raw!r}")
    valid = [f.name for f in dataclasses.fields(DatasetConfig)]
    _unknown("dataset.", set(raw) - set(valid), valid)
    d = DatasetConfig(**raw)
    d.path = _str("dataset.path", d.path, optional=True)
    if d.path in ("default", "gsm8k-sample"):
        d.path = None
    d.format = _str("dataset.format", d.format, choices=("gsm8k", "text"))
    d.train_split = _str("dataset.train_split", d.train_split)
    d.eval_split = _str("dataset.eval_split", d.eval_split, optional=True)
    d.max_train_samples = _int("dataset.max_train_samples", d.max_train_samples, 1, optional=True)
    d.max_eval_samples = _int("dataset.max_eval_samples", d.max_eval_samples, 1, optional=True)
    if d.path is not None and not Path(d.path).expanduser().is_dir():
        raise ConfigError(f"dataset.path: {d.path!r} is not a directory; it must hold <split>.jsonl files "
                          "(omit it for the bundled GSM8K sample)")
    from surogate.data import split_path

    for key, split in (("dataset.train_split", d.train_split), ("dataset.eval_split", d.eval_split)):
        if split is not None and not split_path(d.path, split).is_file():
            raise ConfigError(f"{key}: {split_path(d.path, split)} does not exist")
    return d


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Check every key and value of `raw` and return the config; raises ConfigError naming the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw).__name__}")
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    _unknown("", set(raw) - set(valid), valid)
    raw = dict(raw)
    dataset = _dataset(raw.pop("dataset", None))
    c = TrainConfig(**raw, dataset=dataset)
    c.model = _model("model", c.model)
    c.tokenizer = _tokenizer("tokenizer", c.tokenizer)
    c.recipe = _recipe("recipe", c.recipe)
    c.arch = _arch("arch", c.arch)
    c.allow_emulation = _bool("allow_emulation", c.allow_emulation)
    c.sequence_len = _int("sequence_len", c.sequence_len, 2)
    c.sample_packing = _bool("sample_packing", c.sample_packing)
    c.per_device_train_batch_size = _int("per_device_train_batch_size", c.per_device_train_batch_size, 1)
    c.per_device_eval_batch_size = _int("per_device_eval_batch_size", c.per_device_eval_batch_size, 1, optional=True)
    c.gradient_accumulation_steps = _int("gradient_accumulation_steps", c.gradient_accumulation_steps, 1)
    c.learning_rate = _float("learning_rate", c.learning_rate, 0.0)
    if c.learning_rate == 0:
        raise ConfigError("learning_rate: must be > 0")
    c.warmup_steps = _int("warmup_steps", c.warmup_steps, 0)
    c.weight_decay = _float("weight_decay", c.weight_decay, 0.0)
    c.lr_scheduler_type = _str("lr_scheduler_type", c.lr_scheduler_type, choices=SCHEDULERS)
    c.max_grad_norm = _float("max_grad_norm", c.max_grad_norm, 0.0, optional=True)
    c.lora_rank = _int("lora_rank", c.lora_rank, 1)
    c.lora_alpha = _float("lora_alpha", c.lora_alpha, 0.0)
    c.lora_dropout = _float("lora_dropout", c.lora_dropout, 0.0, 0.999)
    c.lora_target_modules = _targets("lora_target_modules", c.lora_target_modules)
    c.output_dir = _str("output_dir", c.output_dir)
    c.max_steps = _int("max_steps", c.max_steps, 1, optional=True)
    c.num_epochs = _float("num_epochs", c.num_epochs, 0.0)
    if c.max_steps is None and c.num_epochs == 0:
        raise ConfigError("num_epochs: must be > 0 when max_steps is not set")
    c.seed = _int("seed", c.seed, 0)
    c.logging_steps = _int("logging_steps", c.logging_steps, 1)
    c.eval_steps = _int("eval_steps", c.eval_steps, 1, optional=True)
    c.cuda_graphs = _cuda_graphs("cuda_graphs", c.cuda_graphs)
    c.gradient_checkpointing = _bool("gradient_checkpointing", c.gradient_checkpointing)
    if c.model == "default" and c.tokenizer not in (None, "default"):
        raise ConfigError("tokenizer: the embedded default model is built for the default tokenizer; "
                          "drop the tokenizer key or set model to a directory or hub id")
    return c


def default_config_path() -> Path:
    """The embedded default config that `surogate train` runs with no argument."""
    from surogate.data import package_data_dir

    return package_data_dir() / "default.yaml"


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` (YAML value; dotted keys reach into dataset) from `--set`."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: write it as key=value, e.g. --set max_steps=10")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def load_config(path: "str | os.PathLike | None" = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read and check a YAML config (None: the embedded default), then apply `key=value` overrides."""
    p = default_config_path() if path is None else Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; run `surogate train` with no argument for "
                          "the embedded default, or see examples/configs/")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a config must be a mapping of keys to values, got {type(raw).__name__}")
    for item in overrides or []:
        key, value = parse_override(item)
        if key.startswith("dataset."):
            ds = raw.get("dataset") or {}
            ds = {"path": ds} if isinstance(ds, str) else dict(ds)
            ds[key.split(".", 1)[1]] = value
            raw["dataset"] = ds
        else:
            raw[key] = value
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except TypeError as e:  # a dataclass rejected something the checks above did not foresee
        raise ConfigError(f"{p}: {e}") from None
