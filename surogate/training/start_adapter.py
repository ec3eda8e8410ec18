"""Starting a run from an existing LoRA adapter: `lora_model_dir` (Axolotl's key), for a second stage of SFT or
more training on new data, from an adapter that surogate or PEFT wrote.

The adapter decides what the run trains: its rank, alpha, target modules and target parameters (MoE experts) are
read from its adapter_config.json when the config is checked (`take_shape`), and a lora_* key written with another
value is refused, naming the key to drop (it would otherwise be ignored without a word); `lora_dropout`, how the run
trains rather than what the adapter is, is the config's when written, else the adapter's. Before any weight loads,
the adapter's tensors (names and shapes, from the file's header) are matched with the LoRA layers PEFT builds on the
model's meta-device copy (`check_fits`), so an adapter of another base fails in one line. `attach` copies its
weights into the LoRA layers and reads them back: step 1 starts from exactly them. A resumed run then restores its
checkpoint's weights over them (checkpoint.restore): the checkpoint wins.

`model:` naming an adapter folder is refused with the two keys to write (`adapter_not_model`) rather than loading
the base its adapter_config.json names: that name is often another machine's path or another copy of the model,
and loading it unasked would hide which weights the run trains on (Axolotl and LLaMA-Factory take the two apart too).

Checking the config imports no torch (as config.py); the functions that build layers import it themselves.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surogate.training.config import ConfigError, TrainConfig, first_line

if TYPE_CHECKING:
    from surogate.training.setup import Log

CONFIG_FILE = "adapter_config.json"  # adapters.ADAPTER_CONFIG / ADAPTER_WEIGHTS (that module imports torch)
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT reads either, safetensors first
# init_lora_weights whose adapter fits only a base PEFT changed when it attached it (PiSSA, OLoRA, CorDA, LoftQ
# subtract their initial factors from the base weights), or that make a variant (MiCA: B frozen): prefixes.
_NOT_PLAIN_INITS = ("pissa", "olora", "corda", "loftq", "mica")
# Adapter fields that train more than LoRA factors (whole modules, embedding rows): surogate trains the factors only.
_WHOLE_MODULES = ("modules_to_save", "trainable_token_indices")
# The run's keys that the adapter's shape sets, and its adapter_config.json fields.
SHAPE_KEYS = {"lora_rank": "r", "lora_alpha": "lora_alpha", "lora_target_modules": "target_modules",
              "lora_target_parameters": "target_parameters"}


def read_adapter_config(folder: str, key: str = "lora_model_dir") -> dict[str, Any]:
    """`folder`'s adapter_config.json, checked as far as files tell: a LoRA adapter with its weights, made to fit
    an unchanged base and training LoRA factors only. Each failure is a ConfigError naming `key`."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{key}: {folder!r} is not a folder; give the folder of a LoRA adapter ({CONFIG_FILE} and "
                          f"{WEIGHT_FILES[0]}), such as an earlier run's output_dir/adapter")
    if not (p / CONFIG_FILE).is_file():
        if (p / "adapter" / CONFIG_FILE).is_file():
            hint = f"; the adapter of that run is in its adapter/ folder: write {key}: {p / 'adapter'}"
        elif (p / "config.json").is_file():
            hint = f"; it holds a whole model (config.json): give it as model:, and {key} the folder of an adapter"
        else:
            hint = " (surogate writes an adapter to output_dir/adapter, PEFT with save_pretrained)"
        raise ConfigError(f"{key}: {folder!r} has no {CONFIG_FILE}{hint}")
    try:
        raw = json.loads((p / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {p / CONFIG_FILE} cannot be read as JSON ({first_line(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: {p / CONFIG_FILE} is not a mapping of PEFT's config fields")
    kind = raw.get("peft_type")
    if kind != "LORA":
        raise ConfigError(f"{key}: {folder!r} holds a {kind or 'untyped'} adapter (peft_type in {CONFIG_FILE}), not "
                          "LoRA; surogate trains LoRA adapters only: give a LoRA adapter, or drop "
                          f"{key} to start a new one")
    if not any((p / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"{key}: {folder!r} has {CONFIG_FILE} but no {WEIGHT_FILES[0]} (nor {WEIGHT_FILES[1]}), "
                          "so no weights to start from; copy the adapter's weights there")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_NOT_PLAIN_INITS):
        raise ConfigError(f"{key}: {folder!r} was made with init_lora_weights: {init}, which fits only a base "
                          "changed by it (PiSSA, OLoRA, CorDA, LoftQ) or is a variant (MiCA); convert it to a plain "
                          "LoRA adapter first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion="
                          "...)) and start from that")
    for field in _WHOLE_MODULES:
        if raw.get(field):
            raise ConfigError(f"{key}: {folder!r} also trains whole modules or rows ({field}: {raw[field]!r}), and "
                              "surogate trains the LoRA factors only; give an adapter without them")
    return raw


def _adapter_shape(raw: dict[str, Any]) -> dict[str, Any]:
    """The run's shape keys as the adapter's config gives them."""
    targets = raw.get("target_modules")
    return {"lora_rank": raw.get("r", 8), "lora_alpha": float(raw.get("lora_alpha", 8)),  # PEFT's defaults
            "lora_target_modules": sorted(targets) if isinstance(targets, list) else [targets] if targets else [],
            "lora_target_parameters": sorted(raw.get("target_parameters") or [])}


def _same(key: str, written: Any, adapter: Any) -> bool:
    if key in ("lora_target_modules", "lora_target_parameters"):
        return set(written) == set(adapter)
    return float(written) == float(adapter)


def take_shape(cfg: TrainConfig, written: set[str]) -> None:
    """Set `cfg`'s LoRA shape keys to those of the adapter in `cfg.lora_model_dir`: the run trains the adapter as it
    is. A key of `written` (the config's own keys) with another value is refused, naming it to drop; `lora_dropout`
    not written is the adapter's."""
    raw = read_adapter_config(cfg.lora_model_dir)
    for key, value in _adapter_shape(raw).items():
        mine = getattr(cfg, key)
        if key in written and mine is not None and not _same(key, mine, value):
            raise ConfigError(f"{key}: {_shown(mine)}, but the adapter in lora_model_dir ({cfg.lora_model_dir!r}) "
                              f"has {SHAPE_KEYS[key]} {_shown(value)} ({CONFIG_FILE}), and the run trains the adapter "
                              f"as it is; drop {key}")
        setattr(cfg, key, value)
    if "lora_dropout" not in written:
        cfg.lora_dropout = float(raw.get("lora_dropout") or 0.0)


def _shown(value: Any) -> str:
    return (", ".join(value) or "none") if isinstance(value, list) else f"{value:g}"


def adapter_not_model(key: str, value: str, folder: Path) -> str:
    """The one line for a model key (`model`, merge's BASE) naming a folder that holds an adapter, not a model."""
    from surogate.training.checkpoint import is_checkpoint

    try:
        base = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    said = f"{base} (its {CONFIG_FILE} names it)" if base else "<the model it was trained on>"
    head = f"{key}: {value!r} holds a LoRA adapter ({CONFIG_FILE}), not a model"
    if key != "model":
        return f"{head}; give the model it was trained on as {key}: {said}"
    resume = (f"; or, to continue that run where it stopped (optimizer and data order too), resume_from_checkpoint: "
              f"{value}" if is_checkpoint(folder) else "")
    return f"{head}; to train on from it, write model: {said} and lora_model_dir: {value}{resume}"


# --- the LoRA layers (torch from here on) --------------------------------------------------------

def lora_config(cfg: TrainConfig):
    """The adapter's LoraConfig, set for this run: trainable, `cfg.lora_dropout`, and factors created by PEFT's
    default init, which the adapter's weights then replace (a data-dependent init would only cost time)."""
    from peft import LoraConfig

    from surogate.compat import quiet_peft_deprecations

    with quiet_peft_deprecations():
        config = LoraConfig.from_pretrained(str(Path(cfg.lora_model_dir).expanduser()))
    return dataclasses.replace(config, lora_dropout=cfg.lora_dropout, inference_mode=False, init_lora_weights=True,
                               task_type=config.task_type or "CAUSAL_LM")


def _fit_error(cfg: TrainConfig, base: str | None, why: str) -> ConfigError:
    """`base`: the model the adapter was trained on, as its config names it (PEFT overwrites it when it attaches)."""
    return ConfigError(f"lora_model_dir: {cfg.lora_model_dir!r} does not fit {cfg.model} ({why}); it was trained on "
                       f"{base or 'another model'}: set model: to the model it was trained on, or drop "
                       "lora_model_dir to start a new adapter")


def _lora_layers(model, cfg: TrainConfig, config):
    """`model` with the adapter's LoRA layers attached by PEFT (a refused LoRA variant, or targets PEFT finds no
    layer for, as a ConfigError)."""
    from peft import get_peft_model

    from surogate.compat import quiet_peft_deprecations
    from surogate.compiler import lora_variant

    base = config.base_model_name_or_path
    variant = lora_variant(config)
    if variant is not None:
        raise ConfigError(f"lora_model_dir: {cfg.lora_model_dir!r} is a LoRA variant surogate does not train "
                          f"({variant[0]}: {variant[1]!r} in its {CONFIG_FILE}); train it on with PEFT alone, or drop "
                          "lora_model_dir to start a plain LoRA adapter")
    try:
        with quiet_peft_deprecations():  # the base named: this run's (PEFT would warn that it renamed the adapter's)
            return get_peft_model(model, dataclasses.replace(config, base_model_name_or_path=None))
    except (ValueError, KeyError, RuntimeError, TypeError) as e:  # PEFT: "Target modules {...} not found"
        raise _fit_error(cfg, base, f"PEFT: {first_line(e)}") from None


def _file_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The adapter file's tensor shapes by name, from its header (safetensors) or loaded onto the meta device."""
    import torch

    path = folder / WEIGHT_FILES[0]
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = torch.load(folder / WEIGHT_FILES[1], map_location="meta", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def _file_tensors(folder: Path) -> dict:
    import torch

    path = folder / WEIGHT_FILES[0]
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(folder / WEIGHT_FILES[1], map_location="cpu", weights_only=True)


def check_fits(cfg: TrainConfig, meta) -> None:
    """Before any weight loads: the adapter's tensors are those of the LoRA layers PEFT builds on `meta` (the run's
    model on the meta device, changed here: a throwaway copy), by name and shape."""
    from peft import get_peft_model_state_dict

    from surogate.training.adapters import lora_mismatch

    config = lora_config(cfg)
    base = config.base_model_name_or_path
    here = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(_lora_layers(meta, cfg, config)).items()}
    why = lora_mismatch(_file_shapes(Path(cfg.lora_model_dir).expanduser()), here, "the adapter")
    if why is not None:
        raise _fit_error(cfg, base, why)


def attach(model, cfg: TrainConfig, log: Log):
    """The PeftModel of `model` with the adapter in `cfg.lora_model_dir` as its trainable LoRA weights, read back
    to be sure they are the file's."""
    from surogate.training.adapters import load_lora_weights

    folder = Path(cfg.lora_model_dir).expanduser()
    config = lora_config(cfg)
    base = config.base_model_name_or_path
    peft_model = _lora_layers(model, cfg, config)
    saved = _file_tensors(folder)
    why = load_lora_weights(peft_model, saved, "the adapter")
    if why is not None:
        raise _fit_error(cfg, base, why)
    if base and cfg.model != "default" and Path(base).name.lower() != Path(cfg.model).name.lower():
        log(f"note: lora_model_dir: the adapter was trained on {base} ({CONFIG_FILE}), this run's model is "
            f"{cfg.model}; its layers fit, so it trains on")
    log(f"lora_model_dir: starting from the adapter in {folder} (r={config.r}, alpha={config.lora_alpha:g}, "
        f"{len(saved)} LoRA tensors)")
    return peft_model
