"""What `surogate train` checks against the model and the checkpoint before any weight loads.

The config checks (surogate/training/config.py) see keys and files; these need the model's config (a few kB:
the embedded one, a local config.json, or the hub's) and its layer names, read from the layers built
on the meta device (no memory, no initialisation). Each failure is a `ConfigError` naming the key, so
that the CLI prints one line and exits 2 instead of a traceback after the model loaded.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surogate.training import checkpoint
from surogate.training.config import DEFAULT_TARGETS, ConfigError, TrainConfig, first_line
from surogate.training.outputs import counted

# Keys a resumed run must share with its checkpoint: they decide the data order and the LoRA shape; the
# optimizer's param groups (its learning rate, the schedule's base, weight decay, Adam's betas and epsilon), which
# the restored optimizer and scheduler states bring back, so that a changed value would be ignored without a word;
# and the schedule's shape (its type, the warmup), which the restored step count would enter mid-way: the rate
# would jump.
RESUME_KEYS = ("seed", "per_device_train_batch_size", "gradient_accumulation_steps", "lora_rank", "lora_alpha",
               "lora_target_modules", "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps",
               "group_by_length", "adam_beta1", "adam_beta2", "adam_epsilon")
_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def is_local_model(name: str) -> bool:
    """Whether `model:` names an existing local folder."""
    return Path(name).expanduser().is_dir()


def model_config(name: str, key: str = "model", trust_remote_code: bool = False):
    """The config of model `name` without its weights: the embedded one ("default"), a local folder's
    config.json, or the hub's (a few kB); one that cannot be read is a ConfigError naming `key`, and one that
    needs its own code without `trust_remote_code` the line saying so (surogate/training/remote_code.py)."""
    from transformers import AutoConfig

    from surogate.training import remote_code

    if name == "default":
        from surogate.training.setup import embedded_model_config

        return embedded_model_config()
    if is_local_model(name):
        path = Path(name).expanduser()
        try:
            return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as e:
            if not trust_remote_code and remote_code.needs_remote_code(str(path)):
                raise ConfigError(remote_code.refusal(key, str(path))) from None
            raise ConfigError(f"{key}: {path / 'config.json'} is not a config transformers reads "
                              f"({first_line(e)})") from None
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True,  # a cached hub model: no network
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        pass
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry lines ("Retrying in 8s") would bury the one-line error
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # not found, no network, offline without a cached copy: hub errors come in many types
        if not trust_remote_code and remote_code.needs_remote_code(name):
            raise ConfigError(remote_code.refusal(key, name)) from None
        if _hub_unreachable(e):  # the name may well be right: say what is missing, not how to spell it
            raise ConfigError(f"{key}: {name!r} is not a local folder nor a cached hub model, and the hub could not "
                              f"be reached (no network, or offline mode); download it first (hf download {name}) "
                              f"on a machine with network, or point {key} at a local folder of the model") from None
        raise ConfigError(f"{key}: {name!r} is not a local folder, and the hub gave no config for it "
                          f"({first_line(e)}); write ./{name} for a local folder, or a hub id such as "
                          "Qwen/Qwen3-0.6B") from None
    finally:
        hub_logger.setLevel(level)


def _hub_unreachable(e: BaseException) -> bool:
    """Whether the hub failed for want of a connection (or in offline mode) rather than for the name:
    huggingface_hub raises LocalEntryNotFoundError then, which transformers wraps in an OSError."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, LocalEntryNotFoundError) or "couldn't connect to" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def max_positions(config) -> int | None:
    """The longest sequence the model's positions cover, when its config says."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in _POSITION_ATTRS:
        value = getattr(text, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def meta_model(config, trust_remote_code: bool = False) -> nn.Module | None:
    """The model's layers on the meta device (names and shapes, no memory), or None when the architecture
    cannot be built there (then the names are read after the load, before LoRA is attached)."""
    from surogate.training.model_class import causal_lm_class

    try:
        with torch.device("meta"):
            return causal_lm_class(config).from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an architecture whose construction needs real tensors: checked after the load instead
        return None


def check_lora_targets(cfg: TrainConfig, model: nn.Module) -> None:
    """Every name in `lora_target_modules` must match a linear layer (PEFT's suffix rule). The default list
    means the model's own default targets (surogate.compile's rule: those of the list it has, with their
    companions, else every linear of its blocks), so it needs no match. With `lora_model_dir` the adapter's own
    targets are the run's, checked against the model's layers with its weights' shapes (`check_model`, or when
    the adapter is attached)."""
    if cfg.lora_model_dir is not None:
        return
    from surogate.compiler import linear_module_names, short_linear_names, unmatched_targets
    from surogate.moe import check_target_parameters, expert_target_parameters

    experts = expert_target_parameters(model)  # e.g. experts.gate_up_proj: the pieces gate, up
    try:  # the 3-D expert parameters: refused here in one line, not after the load by compile's traceback
        check_target_parameters(model, cfg.lora_target_parameters)
    except ValueError as e:
        what = "set names from that list, or [] for no expert LoRA" if experts else "leave it out"
        raise ConfigError(f"lora_target_parameters: {e}; {what}") from None
    targets = cfg.lora_target_modules
    if targets == ["all-linear"]:
        return
    missing = unmatched_targets(targets, linear_module_names(model))
    if not missing or list(targets) == list(DEFAULT_TARGETS):  # the default resolves to the model's own targets
        return
    verb = "matches" if len(missing) == 1 else "match"
    pieces = {p for e in experts for p in e.rsplit(".", 1)[-1].removesuffix("_proj").split("_")}
    hint = (f"; the experts are 3-D parameters that get LoRA through lora_target_parameters (by default "
            f"[{', '.join(experts)}], one pair per expert): leave those names out"
            if any(t.removesuffix("_proj") in pieces for t in missing) else "")
    raise ConfigError(f"lora_target_modules: {', '.join(missing)} {verb} no linear layer of {cfg.model}; its linear "
                      f"layers: {', '.join(short_linear_names(model))} (or [all-linear]){hint}")


def check_model(cfg: TrainConfig) -> bool:
    """`sequence_len` against the model's positions, `sample_packing` against its attention and
    `lora_target_modules` (or the adapter in `lora_model_dir`) against its linear layers, from its config alone.
    Returns whether the targets were checked (False: check them after the load)."""
    config = model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    limit = max_positions(config)
    if limit is not None and cfg.sequence_len > limit:
        raise ConfigError(f"sequence_len: {cfg.sequence_len} is more than the model's max_position_embeddings "
                          f"({limit}); set sequence_len to {limit} or less")
    meta = meta_model(config, cfg.trust_remote_code)
    if meta is None:
        return False
    check_packing(cfg, meta)
    if cfg.lora_model_dir is not None:
        from surogate.training import start_adapter

        start_adapter.check_fits(cfg, meta)
    else:
        check_lora_targets(cfg, meta)
    return True


def check_packing(cfg: TrainConfig, model: nn.Module) -> None:
    """`sample_packing` on a model where packed examples cannot train as they would alone
    (`surogate.ops.attention.packing_refusal`), refused before the data is laid out in rows."""
    from surogate.ops import attention

    refusal = attention.packing_refusal(model) if cfg.sample_packing else None
    if refusal:
        raise ConfigError(f"sample_packing: {type(model).__name__} {refusal}; set sample_packing: false (one "
                          "example per row, padded)")


def check_vocab(cfg: TrainConfig, tokenizer) -> None:
    """The tokenizer's ids fit the model's embedding (`vocab_size` in its config): a larger tokenizer would
    index past the embedding at the first step. Checked from the config, before the data is tokenized; the
    embedded default is sized to its tokenizer, and a config without `vocab_size` is checked after the load."""
    if cfg.model == "default":
        return
    config = model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ConfigError(vocab_message(len(tokenizer), vocab, cfg))


def vocab_message(tokens: int, vocab: int, cfg: TrainConfig) -> str:
    """The one line for a tokenizer larger than the model's embedding, naming which tokenizer was taken."""
    from surogate.training.tokenizer import has_tokenizer_files

    if cfg.tokenizer is not None:
        source = repr(cfg.tokenizer)
    elif is_local_model(cfg.model) and not has_tokenizer_files(Path(cfg.model).expanduser()):
        source = f"the embedded default ({cfg.model} has none)"
    else:
        source = f"{cfg.model}'s own"
    return (f"tokenizer: {source} has {tokens} tokens, but the model's embedding has {vocab} (its vocab_size); "
            f"set tokenizer: to one of at most {vocab} tokens, such as the one the model was trained with")


def resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint `resume_from_checkpoint` names: a path, or (true) the latest in `output_dir`."""
    value = cfg.resume_from_checkpoint
    if value is None or value is False:
        return None
    if value is True:
        found = checkpoint.latest(Path(cfg.output_dir).expanduser())
        if found is None:
            raise ConfigError(f"resume_from_checkpoint: true, but {cfg.output_dir!r} holds no checkpoint-<step>/ "
                              "folder (a run writes them with save_steps); drop the key to start a new run")
        return found
    path = Path(value).expanduser()
    if not checkpoint.is_checkpoint(path):
        raise ConfigError(f"resume_from_checkpoint: {value!r} is not a checkpoint folder (no "
                          f"{checkpoint.STATE_FILE}); give output_dir/checkpoint-<step>, or true for the latest")
    return path


def check_device(cfg: TrainConfig, device: torch.device) -> None:
    """`arch` and `cuda_graphs: true` against the device the run takes: on a machine without a GPU, a GPU
    arch or CUDA graphs fail here, before any data loads, not at compile or at the first step."""
    if device.type == "cuda":
        return
    if cfg.arch not in (None, "cpu"):
        raise ConfigError(f"arch: {cfg.arch} needs a GPU, and this machine has none (torch sees no CUDA device); "
                          "drop arch, or set arch: cpu, to train on the CPU reference")
    if cfg.cuda_graphs == "true":
        raise ConfigError("cuda_graphs: true needs a GPU, and this machine has none (torch sees no CUDA device); "
                          "set cuda_graphs: auto or false")


def _names(paths: list[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def check_output_dir(cfg: TrainConfig, resume: Path | None) -> list[Path]:
    """The checkpoints in `output_dir` that this run does not continue (`checkpoint.not_continued`): they
    would outrank its own in `resume_from_checkpoint: true` and `save_total_limit`, which go by step.
    Refused, unless `overwrite_output_dir: true`; then returned, for the run to delete once it writes its own."""
    out = Path(cfg.output_dir).expanduser()
    others = checkpoint.not_continued(out, resume)
    if not others or cfg.overwrite_output_dir:
        return others
    if resume is None:
        raise ConfigError(f"output_dir: {cfg.output_dir!r} holds checkpoints of an earlier run ({_names(others)}); "
                          "continue it with resume_from_checkpoint: true, write to another output_dir, or set "
                          "overwrite_output_dir: true to replace them")
    raise ConfigError(f"output_dir: {cfg.output_dir!r} holds {_names(others)}, not on the way to {resume.name} that "
                      "this run continues from (resume_from_checkpoint: true and save_total_limit would take them for "
                      "this run's); move them away, or set overwrite_output_dir: true to replace them")


def data_fingerprint(rows, cfg: TrainConfig) -> str:
    """A short hash of the train rows as the run sees them: count, tokens, the first rows in order and
    in the seeded shuffled order. A resumed run on other data (another dataset, sequence_len, packing or
    tokenizer) would not repeat the interrupted one."""
    h = hashlib.sha256(f"{len(rows)} {rows.num_tokens} {rows.packed}".encode())
    size = cfg.per_device_train_batch_size
    for batch in (next(iter(rows.batches(size)), None), next(iter(rows.batches(size, shuffle=True, seed=cfg.seed)),
                                                             None)):
        for key in sorted(batch or {}):
            h.update(key.encode())
            h.update(batch[key].numpy().tobytes())
    return h.hexdigest()[:16]


def resume_keys(cfg: TrainConfig) -> dict[str, Any]:
    return {key: getattr(cfg, key) for key in RESUME_KEYS}


def run_layout(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """How many processes ran the job and how (what a checkpoint records and a resume must match):
    the world size decides the global batch and the data each rank takes; the parallelism, how the
    optimizer state is stored (a plain state_dict, or whole tensors by parameter name under fsdp)."""
    return {"world_size": world, "parallelism": cfg.parallelism if world > 1 else None}


def check_resume_steps(state: dict[str, Any], total: int, path: Path) -> None:
    """The run's total steps reach past the checkpoint's step: resuming below it would rewrite the outputs of
    a longer run with those of a shorter one (its adapter, metrics) without training anything."""
    done = state["global_step"]
    if done > total:
        raise ConfigError(f"resume_from_checkpoint: {path.name} is at step {done}, past this run's {counted(total, 'step')}; "
                          f"set max_steps (or num_epochs) to at least {done}, or start a new run in another "
                          "output_dir")


def check_resumable(cfg: TrainConfig, state: dict[str, Any], fingerprint: str, path: Path, world: int = 1) -> None:
    """The checkpoint at `path` was trained with this config's data order and LoRA shape, on as many
    processes (and with the same parallelism) as this job has."""
    saved_world = state.get("world_size", 1)
    if saved_world != world:
        raise ConfigError(f"resume_from_checkpoint: {path.name} was written by a job of {saved_world} "
                          f"process{'es' if saved_world != 1 else ''}, this one has {world}; resume with the same "
                          f"world size (torchrun --nproc-per-node {saved_world}" + (", or no torchrun" if saved_world == 1
                                                                                    else "") + ")")
    layout = run_layout(cfg, world)
    if state.get("parallelism") != layout["parallelism"]:
        raise ConfigError(f"resume_from_checkpoint: {path.name} was trained with parallelism: {state.get('parallelism')}, "
                          f"the config has {layout['parallelism']}; resume with the same parallelism")
    saved = state.get("resume_keys", {})
    for key in RESUME_KEYS:
        if key in saved and saved[key] != getattr(cfg, key):
            raise ConfigError(f"resume_from_checkpoint: {path.name} was trained with {key}: {saved[key]!r}, the "
                              f"config has {getattr(cfg, key)!r}; resume with the same value, or start a new run in "
                              "another output_dir")
    if state.get("train_data") != fingerprint:
        raise ConfigError(f"resume_from_checkpoint: the train rows differ from those {path.name} was trained on "
                          "(dataset, sequence_len, excess_length_strategy, sample_packing or tokenizer changed); "
                          "resume with the same data, or start a new run in another output_dir")
