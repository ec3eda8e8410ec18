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

from surogate.lora_targets import DEFAULT_TARGETS  # the same default as surogate.compile (no torch imported)

SCHEDULERS = ("linear", "cosine", "constant")
# What a Hugging Face hub id looks like (`name` or `owner/name`): a path that matches it and is not on disk
# is taken for a hub id (config.model, dataset.path).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ConfigError(ValueError):
    """A config key is unknown, has a bad value, or names a file that does not exist."""


def first_line(e: BaseException) -> str:
    """An exception's first line (at most 200 characters): what a one-line ConfigError quotes of a library's error."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


@dataclass
class DatasetConfig:
    """Where the examples are and how to read them."""

    path: str | None = None  # a .jsonl/.json/.parquet file, a folder, or a HF dataset; None: the bundled GSM8K sample
    format: str = "auto"  # auto, messages, sharegpt, alpaca, completion, gsm8k, text (surogate/training/data_formats.py)
    train_split: str = "train"
    eval_split: str | None = "test"  # None: no evaluation; a single file has none
    val_set_size: float | int | None = None  # hold out this fraction (0, 1) or count of train as eval (Axolotl)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    train_on_inputs: bool = False  # train on the read part too (prompts, user turns): Axolotl's train_on_inputs
    chat_template: str | None = None  # messages: chatml, a Jinja string or a .jinja file; None: the tokenizer's
    cache: bool = True  # keep the tokenized examples under the cache dir for the next run (training/data_cache.py)
    columns: dict[str, str] | None = None  # rename the rows' fields to a format's: {response: output, context: input}


@dataclass
class TrainConfig:
    """One LoRA fine-tuning run. `model: default` is the embedded tiny Qwen3 (random weights)."""

    model: str = "default"  # "default", a local HF directory, or a hub id
    tokenizer: str | None = None  # None: the model's own, else the embedded default
    trust_remote_code: bool = False  # run the model's / tokenizer's own Python code (auto_map): remote_code.py
    recipe: str = "bf16"
    arch: str | None = None  # None: the current GPU (or the CPU reference); "sm_90" etc.
    allow_emulation: bool = False
    sequence_len: int = 256
    # an example longer than sequence_len: "truncate" (its first sequence_len tokens train, as TRL's SFT), "drop"
    # (left out, as Axolotl's default) or "raise" (stop, naming the first one's row)
    excess_length_strategy: str = "truncate"
    sample_packing: bool = True
    group_by_length: bool = False  # padded batches (sample_packing: false) of examples of similar lengths
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int | None = None  # None: the train batch size
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    warmup_steps: int | float = 0  # steps, or (below 1) a ratio of the run's steps, as Hugging Face's
    weight_decay: float = 0.0
    adam_beta1: float = 0.9  # AdamW's betas and epsilon (Hugging Face's names and defaults)
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    lora_target_parameters: list[str] | None = None  # None: every expert of a MoE model; []: none
    # an adapter to start from (Axolotl's key): its rank, alpha and targets are the run's (training/start_adapter.py)
    lora_model_dir: str | None = None
    dataset: DatasetConfig | list[DatasetConfig] = field(default_factory=DatasetConfig)  # a list: a mix
    output_dir: str = "surogate-out"
    overwrite_output_dir: bool = False  # a fresh run replaces the checkpoints of another run in output_dir
    max_steps: int | None = None  # optimizer steps; wins over num_epochs
    num_epochs: float = 1.0
    seed: int = 42
    logging_steps: int | float = 1  # a step count, or (below 1) a ratio of the run's steps, as Hugging Face's
    eval_steps: int | float | None = None  # None: evaluate before the first step and at the end only
    eval_on_start: bool = True  # evaluate before the first step (step 0)
    save_steps: int | float | None = None  # output_dir/checkpoint-<step>/ every N steps and the last (Ctrl-C: always)
    save_total_limit: int | None = None  # keep the N newest checkpoints
    resume_from_checkpoint: str | bool | None = None  # a checkpoint folder, or true: the latest in output_dir
    report_to: list[str] = field(default_factory=list)  # [] (metrics.jsonl only) or [tensorboard]
    cuda_graphs: str = "auto"  # "auto": capture the micro-step on CUDA with packed batches; "true"; "false"
    # true: recompute each decoder block in the backward (less memory); offload: and keep the blocks' saved
    # inputs in host memory between forward and backward (less still, for a GPU of 16 GB)
    gradient_checkpointing: bool | str = False
    # with gradient_checkpointing on: the share of decoder blocks checkpointed, the first ones (0, 1]; the rest keep
    # their activations (more memory, no recompute): surogate.compile(checkpoint_fraction=...)
    gradient_checkpointing_fraction: float = 1.0
    # rebuild norm / SwiGLU / RoPE outputs in the backward (true), keep them (false), or "auto": keep them where GPU
    # memory is plenty and the recipe keeps bf16 weights (surogate.compile(recompute_producers=...))
    recompute_producers: bool | str = "auto"
    # fp8 / qfp8: keep the FP8 copy of the LoRA linears' inputs for the backward instead of bf16 (true: less
    # memory, a little slower), never (false), or "auto": where recompute_producers keeps them
    # (surogate.compile(save_fp8_inputs=...))
    save_fp8_inputs: bool | str = False
    parallelism: str = "ddp"  # under torchrun: "ddp" (whole model per rank) or "fsdp" (frozen bytes sharded)
    fsdp_lora: str = "replicated"  # fsdp: LoRA weights whole on every rank, or "sharded" with their block

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


def _every(key: str, v: Any, optional: bool = False, least: int = 1) -> int | float | None:
    """A count of optimizer steps (>= `least`), or a ratio in (0, 1) of the run's steps (Hugging Face's
    `eval_steps: 0.1`, `warmup_steps: 0.1`, which configs brought from its Trainer hold), turned into steps once the
    run's total is known."""
    if isinstance(v, float) and not isinstance(v, bool) and math.isfinite(v):
        if 0 < v < 1:
            return v
        if v.is_integer() and v >= least:
            return int(v)
    if v is None and optional or isinstance(v, int) and not isinstance(v, bool) and v >= least:
        return v
    raise ConfigError(f"{key}: expected a whole number of steps (>= {least}) or a ratio of the run's steps in (0, 1), "
                      f"got {v!r}")


def every_steps(value: int | float, total: int) -> int:
    """`_every`'s interval in steps for a run of `total` steps: a ratio rounds up, as Hugging Face's Trainer does."""
    return value if isinstance(value, int) else max(1, math.ceil(value * total))


def _float(key: str, v: Any, minimum: float | None = None, maximum: float | None = None,
           optional: bool = False, above: float | None = None) -> float | None:
    """A finite number in [minimum, maximum] (`above`: strictly greater than it)."""
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
    if above is not None and v <= above:
        raise ConfigError(f"{key}: must be > {above:g}, got {v}")
    if maximum is not None and v > maximum:
        raise ConfigError(f"{key}: must be <= {maximum}, got {v}")
    return float(v)


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false, got {v!r}")
    return v


def _beta(key: str, v: Any) -> float:
    """An Adam moment's decay: in [0, 1) (at 1 the moment never moves from its start)."""
    v = _float(key, v, 0.0, 1.0)
    if v == 1.0:
        raise ConfigError(f"{key}: must be < 1, got 1 (the usual values: adam_beta1 0.9, adam_beta2 0.999 or 0.95)")
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
# an example longer than sequence_len: cut to it (TRL's SFT), left out (Axolotl's default), or stop (training/data.py)
EXCESS_LENGTH_STRATEGIES = ("truncate", "drop", "raise")
PARALLELISMS = ("ddp", "fsdp")  # surogate.training.distributed.Parallelism
FSDP_LORA = ("replicated", "sharded")  # surogate.training.distributed.LoraPlacement


def _cuda_graphs(key: str, v: Any) -> str:
    """YAML reads `true`/`false` as booleans; keep one string form."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return _str(key, v, choices=CUDA_GRAPH_MODES)


def _checkpointing(key: str, v: Any) -> bool | str:
    """surogate.compile's `checkpoint=`: false, true or offload."""
    if isinstance(v, bool) or (isinstance(v, str) and v == "offload"):
        return v
    raise ConfigError(f"{key}: expected true, false or offload, got {v!r}")


def _auto_or_bool(key: str, v: Any) -> bool | str:
    """surogate.compile's `recompute_producers=` / `save_fp8_inputs=`: true, false or auto."""
    if isinstance(v, bool) or v == "auto":
        return v
    raise ConfigError(f"{key}: expected auto, true or false, got {v!r}")


def _checkpointing_fraction(key: str, v: Any, checkpointing: bool | str) -> float:
    """surogate.compile's `checkpoint_fraction=`: in (0, 1], below 1 only with checkpointing on."""
    v = _float(key, v, maximum=1.0)
    if v <= 0:
        raise ConfigError(f"{key}: must be > 0 (the share of decoder blocks checkpointed), got {v}")
    if v < 1 and not checkpointing:
        raise ConfigError(f"{key}: {v} needs gradient_checkpointing: true or offload; set one, or drop {key}")
    return v


def check_model_name(key: str, v: Any, allow_default: bool = True) -> str:
    """A model `v` is "default", an existing folder with a config.json, or shaped like a hub id and not
    a mistyped local folder (whether the hub has it is asked before the model loads: train_checks.py)."""
    v = _str(key, v)
    if v == "default" and allow_default:
        return v
    p = Path(v).expanduser()
    if p.exists() or not HUB_ID.match(v) or v.startswith((".", "/", "~")):
        if not p.is_dir():
            raise ConfigError(f"{key}: {v!r} is not a directory; give a local Hugging Face model directory, "
                              "a hub id like 'Qwen/Qwen3-0.6B'"
                              + (", or 'default' for the embedded tiny model" if allow_default else ""))
        if not (p / "config.json").exists():
            if (p / "adapter_config.json").exists():
                from surogate.training.start_adapter import adapter_not_model

                raise ConfigError(adapter_not_model(key, v, p))
            raise ConfigError(f"{key}: {v!r} has no config.json; save the model there with save_pretrained()")
        return v
    why = _not_a_hub_id(v)
    if why:
        raise ConfigError(f"{key}: {v!r} is not a local folder{why}; write ./{v} for a local folder, or a hub id "
                          "such as Qwen/Qwen3-0.6B")
    if _hub_offline() and not _hub_cached(v):  # a right hub id, maybe: say what is missing, not how to spell it
        raise ConfigError(f"{key}: {v!r} is not a local folder nor a cached hub model, and HF_HUB_OFFLINE is set "
                          f"(offline mode); download it first (hf download {v}) on a machine with network, or point "
                          f"{key} at a local folder of the model")
    return v


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE",
                                                                                     "TRANSFORMERS_OFFLINE"))


def _not_a_hub_id(v: str) -> str:
    """Why `v`, shaped like a hub id but no local folder, is a mistyped local path rather than a hub id
    ("" when it may well be one: the hub is asked for its config before the model loads)."""
    head, _, tail = v.partition("/")
    where = Path(head) if tail else Path(".")
    name = tail or head
    if tail and where.is_dir() or not tail:
        close = difflib.get_close_matches(name, [c.name for c in where.iterdir() if c.is_dir()], n=1, cutoff=0.8) \
            if where.is_dir() else []
        if close:
            return f" (did you mean {str(where / close[0]) if tail else close[0]!r}?)"
        if tail:
            return f" ({head}/ is a local folder without {tail})"
    return ""


def _hub_cached(v: str) -> bool:
    """Whether hub id `v` has a config.json in the local hub cache (what an offline run can load)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(v, "config.json"), str)
    except Exception:  # an id the hub library refuses is no cached hub id either
        return False


def _output_dir(key: str, v: Any) -> str:
    v = _str(key, v)
    p = Path(v).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                where = "" if q == p else f" is inside {str(q)!r}, which"
                raise ConfigError(f"{key}: {v!r}{where} is a file, not a folder; name a folder (created if missing)")
            break
    return v


def _resume(key: str, v: Any, output_dir: str) -> str | bool | None:
    if v is None or v is False:
        return None
    from surogate.training import checkpoint

    if v is True:
        if checkpoint.latest(Path(output_dir).expanduser()) is None:
            raise ConfigError(f"{key}: true, but output_dir {output_dir!r} holds no checkpoint-<step>/ folder to "
                              "resume from (a run writes them with save_steps); drop the key to start a new run")
        return True
    v = _str(key, v)
    if not checkpoint.is_checkpoint(Path(v).expanduser()):
        raise ConfigError(f"{key}: {v!r} is not a checkpoint folder (no {checkpoint.STATE_FILE}); give "
                          "output_dir/checkpoint-<step>, or true for the latest in output_dir")
    return v


REPORTERS = ("tensorboard",)


def _report_to(key: str, v: Any) -> list[str]:
    """`none`, `tensorboard`, or a list of them (Hugging Face's spelling); metrics.jsonl is always written."""
    items = [] if v is None else [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ConfigError(f"{key}: expected none, tensorboard or a list of them, got {v!r}")
    out = []
    for item in items:
        if item == "none":
            continue
        if item not in REPORTERS:
            raise ConfigError(f"{key}: {item!r} is not supported; use tensorboard or none (metrics.jsonl in "
                              "output_dir is always written)")
        import importlib.util

        if importlib.util.find_spec(item) is None:
            raise ConfigError(f"{key}: {item} needs the {item} package: pip install {item} (or pip install "
                              f"'surogate[{item}]'), or set {key}: none")
        out.append(item)
    return out


def _tokenizer(key: str, v: Any) -> str | None:
    v = _str(key, v, optional=True)
    if v is None or v == "default":
        return v
    p = Path(v).expanduser()
    if (p.exists() or v.startswith((".", "/", "~")) or not HUB_ID.match(v)) and not p.is_dir():
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


def _names(v: Any) -> Any:
    """A string of names as a list: `q_proj, v_proj` (YAML reads it as one string) means [q_proj, v_proj]."""
    return [name.strip() for name in v.split(",")] if isinstance(v, str) else v


def _targets(key: str, v: Any) -> list[str]:
    v = _names(v)
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{key}: expected a non-empty list of module names like [q_proj, v_proj] "
                          f"(or 'all-linear'), got {v!r}")
    return list(v)


def _parameter_targets(key: str, v: Any) -> list[str] | None:
    if v is None:
        return None
    v = _names(v)
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{key}: expected a list of parameter names like [experts.gate_up_proj, "
                          f"experts.down_proj], [] for none, or null for every expert of a MoE model; got {v!r}")
    return list(v)


_MODEL_KEY = "write model: (a local Hugging Face folder or a hub id)"
_NO_PRECISION = "the recipe sets the precision (recipe: bf16 is the default; surogate info lists the others): drop it"
_NO_ATTENTION = "surogate chooses the attention kernels itself: drop it"
_NO_WANDB = ("write report_to: tensorboard (Weights & Biases is not supported; metrics.jsonl in output_dir is always "
             "written)")
_MASKED = ("the prompt and every turn but the assistant's are masked by default: drop it (dataset.train_on_inputs: "
           "true trains them too)")
# Other trainers' keys (Axolotl, TRL / Hugging Face, Unsloth) and what to write here. difflib alone gave no hint for
# most (max_seq_length, adapter, load_in_4bit, dataset.type) and a wrong one for some (deepspeed: "did you mean
# 'seed'?", warmup_ratio: warmup_steps, which counts steps).
FOREIGN_KEYS = {
    "base_model": _MODEL_KEY, "model_name_or_path": _MODEL_KEY,
    "model_type": "surogate loads AutoModelForCausalLM: drop it",
    "tokenizer_type": "surogate loads AutoTokenizer (from tokenizer:, else the model's folder): drop it",
    "adapter": "surogate always trains a LoRA adapter: drop it; for QLoRA set recipe: qnf4 (the frozen base stored "
               "as bitsandbytes' NF4)",
    "load_in_4bit": "write recipe: qnf4 (the frozen base stored as bitsandbytes' NF4; surogate quantizes it)",
    "load_in_8bit": "write recipe: qfp8 (the frozen base stored as FP8; surogate quantizes it)",
    "lora_r": "write lora_rank", "r": "write lora_rank",
    "target_modules": "write lora_target_modules",
    "lora_target_linear": "write lora_target_modules: all-linear",
    **dict.fromkeys(("lora_modules_to_save", "modules_to_save", "unfrozen_parameters"),
                    "not supported: surogate trains the LoRA factors only; drop it"),
    "adapter_name_or_path": "write lora_model_dir (an adapter to start from)",
    "micro_batch_size": "write per_device_train_batch_size",
    "num_train_epochs": "write num_epochs",
    "max_length": "write sequence_len", "max_seq_length": "write sequence_len", "max_seq_len": "write sequence_len",
    "packing": "write sample_packing (true by default)",
    "pad_to_sequence_len": "packed rows (sample_packing: true) are always sequence_len tokens, and padded batches "
                           "are padded to their longest row: drop it",
    "lr_scheduler": "write lr_scheduler_type (linear, cosine or constant)",
    "warmup_ratio": "write warmup_steps: <the ratio> (below 1 it is a ratio of the run's steps, as Hugging Face's)",
    "optimizer": "surogate trains the LoRA factors with AdamW (set learning_rate, weight_decay, adam_beta1, "
                 "adam_beta2, adam_epsilon): drop it",
    "optim": "surogate trains the LoRA factors with AdamW (set learning_rate, weight_decay, adam_beta1, adam_beta2, "
             "adam_epsilon): drop it",
    "bf16": _NO_PRECISION, "fp16": _NO_PRECISION, "tf32": _NO_PRECISION,
    "flash_attention": _NO_ATTENTION, "sdp_attention": _NO_ATTENTION, "xformers_attention": _NO_ATTENTION,
    "attn_implementation": _NO_ATTENTION,
    "wandb_project": _NO_WANDB, "wandb_entity": _NO_WANDB, "wandb_name": _NO_WANDB,
    "special_tokens": "surogate uses the tokenizer's special tokens (a missing pad token is the EOS): save a "
                      "tokenizer with yours and set tokenizer: to its folder",
    "completion_only_loss": _MASKED, "assistant_only_loss": _MASKED,
    "dataset_text_field": "write dataset.columns: {<your field>: text}",
    "eval_strategy": "write eval_steps: N (without it: an eval before training and at the end)",
    "evaluation_strategy": "write eval_steps: N (without it: an eval before training and at the end)",
    "evals_per_epoch": "write eval_steps: N (optimizer steps)",
    "save_strategy": "write save_steps: N", "saves_per_epoch": "write save_steps: N (optimizer steps)",
    "deepspeed": "run under torchrun with parallelism: fsdp or ddp (docs/cli.md, Several GPUs)",
    "fsdp": "run under torchrun with parallelism: fsdp (docs/cli.md, Several GPUs)",
    "use_gradient_checkpointing": "write gradient_checkpointing (true, false or offload)",
    "random_state": "write seed",
    "chat_template_jinja": "write dataset.chat_template: (the Jinja string, or a path to a .jinja file)",
    **dict.fromkeys(("use_rslora", "peft_use_rslora"),
                    "not supported: the LoRA scale is lora_alpha / lora_rank (for rsLoRA's alpha / sqrt(rank), write "
                    "lora_alpha: alpha x sqrt(rank))"),
    "lora_task_type": "surogate trains causal LMs: drop it",
    "local_rank": "torchrun gives each process its rank: drop it",
    "fsdp_config": "run under torchrun with parallelism: fsdp (docs/cli.md, Several GPUs); surogate wraps the model "
                   "itself: drop it",
    "gradient_checkpointing_kwargs": "surogate checkpoints whole decoder blocks itself (gradient_checkpointing: true "
                                     "or offload): drop it",
    **dict.fromkeys(("hub_model_id", "push_to_hub", "hub_strategy", "hub_private_repo"),
                    "surogate uploads nothing: the adapter is in output_dir/adapter (huggingface_hub's upload_folder "
                    "takes it): drop it"),
    "max_packed_sequence_len": "write sequence_len (a packed row holds sequence_len tokens)",
    "strict": "surogate refuses unknown keys, and a key is replaced from the command line with --set: drop it",
    "dataset_prepared_path": "surogate keeps the tokenized data in its cache (dataset.cache; $SUROGATE_CACHE_DIR says "
                             "where): drop it",
    "lora_fan_in_fan_out": "PEFT reads each layer's layout (GPT-2's Conv1D) itself: drop it",
    **dict.fromkeys(("eval_table_size", "eval_max_new_tokens"), "not supported (generations during eval): drop it"),
    "debug": "not supported (--print-config shows the run's config; the data log counts cut and left-out examples): "
             "drop it",
    **dict.fromkeys(("torch_compile", "torch_compile_backend", "torch_compile_mode"),
                    "surogate compiles the model itself: drop it"),
    "eval_sample_packing": "the eval rows are laid out as sample_packing says: drop it",
    "auto_resume_from_checkpoints": "write resume_from_checkpoint: true (the latest checkpoint in output_dir)",
    "save_safetensors": "the adapter (and each checkpoint's) is saved as safetensors: drop it",
    **dict.fromkeys(("dataloader_num_workers", "dataloader_pin_memory", "dataloader_prefetch_factor"),
                    "surogate makes its batches from rows tokenized before the first step: drop it"),
    **dict.fromkeys(("plugins", "liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_layer_norm",
                     "liger_fused_linear_cross_entropy", "cut_cross_entropy"),
                    "surogate fuses the norms, RoPE, SwiGLU and the LM head's loss itself: drop it"),
    **dict.fromkeys(("early_stopping_patience", "load_best_model_at_end", "metric_for_best_model", "greater_is_better"),
                    "not supported: the run trains max_steps or num_epochs; with eval_steps and save_steps, "
                    "metrics.jsonl gives each checkpoint-<step>'s eval loss to pick the best by: drop it"),
    "neftune_noise_alpha": "not supported (NEFTune's noise on the embeddings): drop it",
    "loraplus_lr_ratio": "not supported (LoRA+'s larger learning rate for lora_B): drop it",
    "lr_scheduler_kwargs": f"not supported: write lr_scheduler_type ({', '.join(SCHEDULERS)}) and warmup_steps: "
                           "drop it",
    **dict.fromkeys(("dataset_num_proc", "dataset_processes"),
                    "surogate tokenizes a large split in several processes itself: drop it"),
    **dict.fromkeys(("use_dora", "peft_use_dora"), "not supported: DoRA (the fused kernels take plain LoRA): drop it"),
    "tokens": "not supported: new tokens need their embeddings trained (surogate trains the LoRA factors only): "
              "drop it",
    **dict.fromkeys(("use_wandb", "wandb_mode", "wandb_watch", "wandb_log_model", "wandb_run_id"), _NO_WANDB),
    **dict.fromkeys(("mlflow_experiment_name", "mlflow_tracking_uri", "mlflow_run_name"),
                    "write report_to: tensorboard (MLflow is not supported; metrics.jsonl in output_dir is always "
                    "written)"),
    "remove_unused_columns": "surogate reads the format's fields only: drop it",
    "bf16_full_eval": "the eval runs in the recipe's precision: drop it",
    "shuffle_merged_datasets": "a mix's rows are shuffled together each epoch (by seed): drop it",
    **dict.fromkeys(("sequence_parallel_degree", "context_parallel_size", "tensor_parallel_size"),
                    "not supported: several GPUs run parallelism: ddp or fsdp under torchrun (docs/cli.md): drop it"),
    **dict.fromkeys(("device_map", "max_memory"),
                    "surogate puts the whole model on the GPU (one a process under torchrun): drop it"),
    **dict.fromkeys(("lr_quadratic_warmup", "cosine_min_lr_ratio", "cosine_constant_lr_ratio"),
                    f"not supported: lr_scheduler_type is one of {', '.join(SCHEDULERS)}: drop it"),
    "peft_layers_to_transform": "not supported in the config (in a script, PEFT's LoraConfig(layers_to_transform=...) "
                                "before surogate.compile is): drop it",
    "truncation_mode": "an example longer than sequence_len keeps its first sequence_len tokens (TRL's keep_start; "
                       "keep_end is not supported): drop it, or write excess_length_strategy: drop or raise",
}
DATASET_FOREIGN_KEYS = {
    "type": "write dataset.format: alpaca, messages (Axolotl's chat_template; sharegpt for from / value turns), text "
            "(Axolotl's completion: raw text, all trained), completion (prompt / completion rows) or auto",
    "split": "write dataset.train_split",
    "chat_template_jinja": "write dataset.chat_template: (the Jinja string, or a path to a .jinja file)",
    "data_files": "write dataset.path: (a file, or a folder of <split> files)",
    "ds_type": "the file's suffix says its type (.jsonl, .json, .parquet, .csv, .tsv): drop it",
    "field_messages": "write dataset.columns: {<your field>: messages}",
    "message_property_mappings": "a message's role / content (ShareGPT's from / value) are read as they are: rename "
                                 "other keys in the data",
    "roles_to_train": "the assistant turns are trained (a turn with train: false or weight: 0 is read), the others "
                      "read: drop it (dataset.train_on_inputs: true trains them all)",
    "message_field_training": "a turn's train / training (false) or weight (0) key is read as it is (the turn is read, "
                              "not trained): drop it, and rename another key in the data",
    "message_field_training_detail": "not supported: a turn trains whole or not at all; drop it",
    "train_on_eos": "each assistant turn's end-of-turn text is trained (Axolotl's train_on_eos: turn): drop it",
    "field_instruction": "write dataset.columns: {<your field>: instruction}",
    "field_input": "write dataset.columns: {<your field>: input}",
    "field_output": "write dataset.columns: {<your field>: output}",
}


def _unknown(where: str, keys: set[str], valid: list[str]) -> None:
    """Unknown keys, each with the likeliest meant one: a dataset key written at the top level (as Axolotl's
    train_on_inputs, chat_template, val_set_size) is `dataset.<key>`; another trainer's key (FOREIGN_KEYS) says
    what to write here. Several are listed one a line, each with its answer, so that a config brought from another
    trainer is mended in one pass (one a run took a dozen runs)."""
    if not keys:
        return
    dataset_keys = [f.name for f in dataclasses.fields(DatasetConfig)] if not where else []
    foreign = DATASET_FOREIGN_KEYS if where else FOREIGN_KEYS

    def hint(k: str) -> str | None:
        close = difflib.get_close_matches(str(k), valid, n=1)
        if k in dataset_keys:
            return f"it belongs under dataset: write dataset.{k} (--set dataset.{k}=...)"
        if k == "datasets":  # Axolotl's key
            return "write dataset: a mapping for one source, or a list of them for a mix"
        if k in foreign:  # a dataset key's hint names it as the error does (dataset[1].format in a mix)
            return foreign[k].replace("dataset.", where) if where else foreign[k]
        if not where and k in DATASET_FOREIGN_KEYS:  # a dataset source's key of another trainer, at the top level
            return f"a dataset key: {DATASET_FOREIGN_KEYS[k]}"
        return f"did you mean {where + close[0]!r}?" if close else None

    ordered = sorted(keys, key=str)
    valid_line = f"valid keys: {', '.join(valid)}"
    if len(ordered) == 1:
        k = ordered[0]
        raise ConfigError(f"unknown key {where + str(k)!r}; {hint(k) or valid_line}")
    lines = [f"  {where + str(k)}: {hint(k) or 'not a key here'}" for k in ordered]
    head = f"{len(ordered)} unknown keys, each with what to write:"
    raise ConfigError("\n".join([head, *lines, f"  ({valid_line})"]))


def _dataset(raw: Any, key: str = "dataset") -> DatasetConfig:
    """One source of examples (`key`: how errors name it, `dataset` or `dataset[1]` in a mix)."""
    if raw is None:
        return DatasetConfig()
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping with path/format/train_split/eval_split, got {raw!r}")
    valid = [f.name for f in dataclasses.fields(DatasetConfig)]
    _unknown(f"{key}.", set(raw) - set(valid), valid)
    d = DatasetConfig(**raw)
    d.path = _str(f"{key}.path", d.path, optional=True)
    if d.path in ("default", "gsm8k-sample"):
        d.path = None
    from surogate.training import data_files
    from surogate.training.chat_template import resolve_chat_template
    from surogate.training.data_formats import FORMAT_NAMES

    d.format = _str(f"{key}.format", d.format, choices=FORMAT_NAMES)
    d.train_split = _str(f"{key}.train_split", d.train_split)
    d.eval_split = _str(f"{key}.eval_split", d.eval_split, optional=True)
    d.max_train_samples = _int(f"{key}.max_train_samples", d.max_train_samples, 1, optional=True)
    d.max_eval_samples = _int(f"{key}.max_eval_samples", d.max_eval_samples, 1, optional=True)
    d.train_on_inputs = _bool(f"{key}.train_on_inputs", d.train_on_inputs)
    d.chat_template = _str(f"{key}.chat_template", d.chat_template, optional=True)
    d.cache = _bool(f"{key}.cache", d.cache)
    if d.columns is not None and (not isinstance(d.columns, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in d.columns.items())):
        raise ConfigError(f"{key}.columns: expected a mapping of your rows' field names to a format's, such as "
                          f"{{response: output, context: input}}; got {d.columns!r}")
    resolve_chat_template(d.chat_template)  # a missing .jinja file fails here, naming the key
    if not isinstance(d.val_set_size, bool) and d.val_set_size == 0:
        d.val_set_size = None  # Axolotl's "hold nothing out" (its default): no eval rows taken from train
    if d.val_set_size is not None:
        v = d.val_set_size
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1 or (isinstance(v, int) and v >= 1)):
            raise ConfigError(f"{key}.val_set_size: expected a fraction in (0, 1) or a count >= 1 of train rows "
                              f"to hold out for eval (0 or null: none), got {v!r}")
        if "eval_split" in raw and d.eval_split is not None:
            raise ConfigError(f"{key}.val_set_size: set together with {key}.eval_split ({d.eval_split!r}); use "
                              "one: set eval_split: null to hold out part of train")
        d.eval_split = None
    d.eval_split = data_files.check_path(d.path, d.train_split, d.eval_split, "eval_split" in raw, key)
    return d


def _datasets(raw: Any) -> DatasetConfig | list[DatasetConfig]:
    """`dataset`: one source, or a list of them (a mix: each read, tokenized and laid out as its own keys say,
    then trained on together)."""
    if not isinstance(raw, list):
        return _dataset(raw)
    if not raw:
        raise ConfigError("dataset: an empty list; give one source (a mapping with path, format...) or several")
    sources = [_dataset(entry if entry is not None else {}, f"dataset[{n}]") for n, entry in enumerate(raw)]
    return sources[0] if len(sources) == 1 else sources


def dataset_sources(cfg: "TrainConfig") -> list[DatasetConfig]:
    """The run's sources of examples: `cfg.dataset` as a list."""
    return list(cfg.dataset) if isinstance(cfg.dataset, list) else [cfg.dataset]


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Check every key and value of `raw` and return the config; raises ConfigError naming the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw).__name__}")
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    _unknown("", set(raw) - set(valid), valid)
    raw = dict(raw)
    dataset = _datasets(raw.pop("dataset", None))
    c = TrainConfig(**raw, dataset=dataset)
    c.model = check_model_name("model", c.model)
    c.tokenizer = _tokenizer("tokenizer", c.tokenizer)
    c.trust_remote_code = _bool("trust_remote_code", c.trust_remote_code)
    c.recipe = _recipe("recipe", c.recipe)
    c.arch = _arch("arch", c.arch)
    c.allow_emulation = _bool("allow_emulation", c.allow_emulation)
    c.sequence_len = _int("sequence_len", c.sequence_len, 2)
    c.excess_length_strategy = _str("excess_length_strategy", c.excess_length_strategy,
                                    choices=EXCESS_LENGTH_STRATEGIES)
    c.sample_packing = _bool("sample_packing", c.sample_packing)
    c.group_by_length = _bool("group_by_length", c.group_by_length)
    c.per_device_train_batch_size = _int("per_device_train_batch_size", c.per_device_train_batch_size, 1)
    c.per_device_eval_batch_size = _int("per_device_eval_batch_size", c.per_device_eval_batch_size, 1, optional=True)
    c.gradient_accumulation_steps = _int("gradient_accumulation_steps", c.gradient_accumulation_steps, 1)
    c.learning_rate = _float("learning_rate", c.learning_rate, above=0.0)
    c.warmup_steps = _every("warmup_steps", c.warmup_steps, least=0)
    c.weight_decay = _float("weight_decay", c.weight_decay, 0.0)
    c.adam_beta1, c.adam_beta2 = (_beta(key, getattr(c, key)) for key in ("adam_beta1", "adam_beta2"))
    c.adam_epsilon = _float("adam_epsilon", c.adam_epsilon, above=0.0)
    if c.lr_scheduler_type == "constant_with_warmup":  # Hugging Face's name: its constant skips warmup_steps
        raise ConfigError("lr_scheduler_type: constant_with_warmup is constant here (it warms up over warmup_steps); "
                          "write constant")
    c.lr_scheduler_type = _str("lr_scheduler_type", c.lr_scheduler_type, choices=SCHEDULERS)
    c.max_grad_norm = _float("max_grad_norm", c.max_grad_norm, 0.0, optional=True)
    c.lora_rank = _int("lora_rank", c.lora_rank, 1)
    c.lora_alpha = _float("lora_alpha", c.lora_alpha)
    if c.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha: must be > 0 (the LoRA scale is lora_alpha / lora_rank: at 0 nothing trains), "
                          f"got {c.lora_alpha:g}; the usual value is 2 x lora_rank")
    c.lora_dropout = _float("lora_dropout", c.lora_dropout, 0.0, 0.999)
    c.lora_target_modules = _targets("lora_target_modules", c.lora_target_modules)
    c.lora_target_parameters = _parameter_targets("lora_target_parameters", c.lora_target_parameters)
    c.lora_model_dir = _str("lora_model_dir", c.lora_model_dir, optional=True)
    if c.lora_model_dir is not None:  # the adapter's shape is what the run trains
        from surogate.training.start_adapter import take_shape

        take_shape(c, set(raw))
    if c.lora_target_parameters and c.lora_dropout:
        raise ConfigError("lora_dropout: must be 0 with lora_target_parameters (PEFT cannot drop out the input of "
                          "an expert's LoRA); set lora_dropout: 0, or lora_target_parameters: [] for no expert LoRA")
    c.output_dir = _output_dir("output_dir", c.output_dir)
    c.overwrite_output_dir = _bool("overwrite_output_dir", c.overwrite_output_dir)
    if c.max_steps == -1:  # Hugging Face's default, its "not set"
        raise ConfigError("max_steps: -1 is Hugging Face's 'not set'; write null or drop the key (num_epochs decides)")
    c.max_steps = _int("max_steps", c.max_steps, 1, optional=True)
    c.num_epochs = _float("num_epochs", c.num_epochs, 0.0)
    if c.max_steps is None and c.num_epochs == 0:
        raise ConfigError("num_epochs: must be > 0 when max_steps is not set, got 0")
    c.seed = _int("seed", c.seed, 0)
    c.logging_steps = _every("logging_steps", c.logging_steps)
    c.eval_steps = _every("eval_steps", c.eval_steps, optional=True)
    if c.eval_steps is not None and all(d.eval_split is None and d.val_set_size is None for d in dataset_sources(c)):
        raise ConfigError("eval_steps: set, but there is no eval split (dataset.eval_split is null); name an eval "
                          "split, set dataset.val_set_size to hold out part of train, or drop eval_steps")
    c.eval_on_start = _bool("eval_on_start", c.eval_on_start)
    c.save_steps = _every("save_steps", c.save_steps, optional=True)
    c.save_total_limit = _int("save_total_limit", c.save_total_limit, 1, optional=True)
    c.resume_from_checkpoint = _resume("resume_from_checkpoint", c.resume_from_checkpoint, c.output_dir)
    c.report_to = _report_to("report_to", c.report_to)
    c.cuda_graphs = _cuda_graphs("cuda_graphs", c.cuda_graphs)
    c.gradient_checkpointing = _checkpointing("gradient_checkpointing", c.gradient_checkpointing)
    c.gradient_checkpointing_fraction = _checkpointing_fraction("gradient_checkpointing_fraction",
                                                                c.gradient_checkpointing_fraction,
                                                                c.gradient_checkpointing)
    c.recompute_producers = _auto_or_bool("recompute_producers", c.recompute_producers)
    c.save_fp8_inputs = _auto_or_bool("save_fp8_inputs", c.save_fp8_inputs)
    c.parallelism = _str("parallelism", c.parallelism, choices=PARALLELISMS)
    c.fsdp_lora = _str("fsdp_lora", c.fsdp_lora, choices=FSDP_LORA)
    if c.fsdp_lora == "sharded" and c.parallelism != "fsdp":
        raise ConfigError("fsdp_lora: sharded needs parallelism: fsdp (ddp keeps the LoRA weights whole on every "
                          "rank); set parallelism: fsdp, or drop fsdp_lora")
    if c.cuda_graphs == "true" and c.parallelism == "fsdp":
        raise ConfigError("cuda_graphs: true cannot run with parallelism: fsdp (FSDP gathers and frees the weights "
                          "from host-side hooks, which a CUDA graph cannot record); set cuda_graphs: auto or false, "
                          "or parallelism: ddp")
    if c.model == "default" and c.tokenizer not in (None, "default"):
        raise ConfigError("tokenizer: the embedded default model is built for the default tokenizer; "
                          "drop the tokenizer key or set model to a directory or hub id")
    return c


def default_config_path() -> Path:
    """The embedded default config that `surogate train` runs with no argument."""
    from surogate.training.data_files import package_data_dir

    return package_data_dir() / "default.yaml"


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from `--set` (dotted keys reach into dataset). The value is read as YAML (numbers, lists,
    null), except where YAML would not take it as written: a value that is not valid YAML (a Jinja
    `chat_template` such as `{% for m in messages %}...`) or that holds ` #` (YAML would cut a comment off,
    `output_dir=out/run #2`) is taken as the string it is."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: write it as key=value, e.g. --set max_steps=10")
    key, value = text.split("=", 1)
    if not value.strip():
        return key.strip(), None
    if re.search(r"\s#", value):
        return key.strip(), value.strip()
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value.strip()


def _names_override(message: str, key: str) -> bool:
    """Whether a from_dict error is about `key` as --set wrote it (dotted for the dataset's keys)."""
    return message.startswith((f"{key}:", f"unknown key {key!r}"))


# Keys whose default can be wrong for another key's value: the splits are checked against dataset.path's files.
_DEPENDS_ON = {"dataset.eval_split": "dataset.path", "dataset.train_split": "dataset.path"}


def _written(raw: dict, key: str) -> bool:
    """Whether the config file's mapping `raw` writes `key` (dotted for the dataset's keys)."""
    section, _, name = key.partition(".")
    if not name:
        return section in raw
    ds = raw.get(section)
    return name in ds if isinstance(ds, dict) else (isinstance(ds, str) and name == "path")


class _DuplicateKey(yaml.YAMLError):
    """A key written twice in one mapping: YAML would keep the last silently."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key written twice in one mapping (with both lines)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        merges = any(k.tag == "tag:yaml.org,2002:merge" for k, _ in node.value)  # `<<: *base` then overrides
        for key_node, _ in [] if merges else node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int, float, bool)):  # unhashable: the loader's own error follows
                continue
            if key in seen:
                raise _DuplicateKey(f"{line}: key {key!r} is set twice (first on line {seen[key]}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_config(path: "str | os.PathLike | None" = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read and check a YAML config (None: the embedded default), then apply `key=value` overrides."""
    p = default_config_path() if path is None else Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; run `surogate train` with no argument for "
                          "the embedded default, or see examples/configs/")
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{p}:{e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # where the parser stopped (0-based line and column)
        if mark is not None and getattr(e, "problem", None):
            raise ConfigError(f"{p}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {e.problem} (a value with "
                              "': ' or '#' in it needs quotes)") from None
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a config must be a mapping of keys to values, got {type(raw).__name__}")
    from_file = dict(raw)  # the file's keys (the overrides below replace the dataset mapping, never change it)
    overridden = []
    for item in overrides or []:
        key, value = parse_override(item)
        overridden.append(key)
        if key.startswith("dataset."):
            ds = raw.get("dataset") or {}
            if isinstance(ds, list):
                raise ConfigError(f"--set {key}: {p}'s dataset is a list of sources; set {key.split('.', 1)[1]} "
                                  "in the file, under the source it belongs to")
            ds = {"path": ds} if isinstance(ds, str) else dict(ds)
            ds[key.split(".", 1)[1]] = value
            raw["dataset"] = ds
        else:
            raw[key] = value
    try:
        return from_dict(raw)
    except ConfigError as e:
        if any(_names_override(str(e), key) for key in overridden):
            raise  # the value came from --set / --output-dir, not from the file
        key = str(e).split(":", 1)[0]
        if _DEPENDS_ON.get(key) in overridden and not _written(from_file, key):
            raise  # a default the file does not write, wrong for a value --set gave (eval_split for a --set path)
        raise ConfigError(f"{p}: {e}") from None
    except TypeError as e:  # a dataclass rejected something the checks above did not foresee
        raise ConfigError(f"{p}: {e}") from None
