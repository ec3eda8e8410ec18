"""LoRA adapters in the PEFT format: save, load, merge.

What surogate trains must leave surogate: an adapter is written as `adapter_model.safetensors`
+ `adapter_config.json` with PEFT's key names (`base_model.model.model.layers.0.self_attn.q_proj.
lora_A.weight`), which `peft.PeftModel.from_pretrained` loads onto the plain bf16 base and vLLM
serves. A quantized recipe changes how the frozen base is stored, never the adapter, so the same
files fit the unquantized base.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
# Wrappers that hold the PEFT model: torch.compile's OptimizedModule, DDP/FSDP, surogate's compiled model.
_WRAPPER_ATTRS = ("peft_model", "_orig_mod", "module", "_module", "model", "_model")
# The `_orig_mod.` that torch.compile puts into parameter names: dropped wherever names are saved or matched.
COMPILE_PREFIX = re.compile(r"(^|\.)_orig_mod\.")


def find_peft_model(model: object, _depth: int = 0):
    """The `peft.PeftModel` inside `model` (itself, or held by a compile/DDP wrapper)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model
    if _depth < 4:
        for attr in _WRAPPER_ATTRS:
            try:
                inner = getattr(model, attr, None)
            except Exception:  # a property that raises is not a wrapper slot
                inner = None
            if inner is not None and inner is not model:
                found = find_peft_model(inner, _depth + 1)
                if found is not None:
                    return found
    if _depth == 0:
        raise TypeError(f"{type(model).__name__} holds no LoRA adapter; attach one with "
                        "surogate.compile(model, lora=LoraConfig(...)) or peft.get_peft_model(model, config)")
    return None


def adapter_state_dict(model: object, adapter_name: str | None = None,
                       state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved key names (adapter name and compile prefixes removed).
    `state_dict`: the model's weights to take them from, by parameter name (None: `model.state_dict()`;
    under FSDP, the whole tensors `distributed.gather_trainable_state` returned)."""
    from peft import get_peft_model_state_dict

    peft_model = find_peft_model(model)
    name = adapter_name or peft_model.active_adapter
    state = get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=name)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = COMPILE_PREFIX.sub(r"\1", key)
        if f".{name}." in key:
            raise RuntimeError(f"adapter key {key!r} still carries the adapter name {name!r}; "
                               "PEFT's key layout changed, please report this")
        out[key] = value.detach().to("cpu").contiguous()
    if not out:
        raise RuntimeError(f"adapter {name!r} has no tensors to save")
    return out


def lora_mismatch(saved: dict[str, tuple[int, ...]], here: dict[str, tuple[int, ...]], what: str) -> str | None:
    """What keeps the LoRA tensors `saved` (PEFT's saved name -> shape, from `what`: "the checkpoint", "the adapter")
    from being this model's (`here`): a layer one has and the other not (another depth, other targets) or another
    shape (another width, another rank); None when they fit."""
    missing, extra = sorted(set(here) - set(saved)), sorted(set(saved) - set(here))
    short = lambda name: name.removeprefix("base_model.model.")  # noqa: E731
    if missing or extra:
        name, where = ((extra[0], f"{what} has it, this model no such layer") if extra else
                       (missing[0], f"this model has the layer, {what} no weights for it"))
        return f"{len(missing) + len(extra)} LoRA tensors differ, e.g. {short(name)}: {where}"
    for name in sorted(saved):
        if saved[name] != here[name]:
            return f"{short(name)} is {list(saved[name])} in {what}, {list(here[name])} in this model"
    return None


def load_lora_weights(peft_model: nn.Module, saved: dict[str, torch.Tensor], what: str) -> str | None:
    """Load `saved` (PEFT's saved names) into `peft_model`'s LoRA layers and read them back: None when they now are
    exactly those tensors, else why not (`lora_mismatch`, or "its weights did not load"), before or without loading."""
    from peft import set_peft_model_state_dict

    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}  # noqa: E731
    why = lora_mismatch(shapes(saved), shapes(adapter_state_dict(peft_model)), what)
    if why is not None:
        return why
    result = set_peft_model_state_dict(peft_model, saved)
    loaded = adapter_state_dict(peft_model)
    if getattr(result, "unexpected_keys", None) or set(loaded) != set(saved) or not all(
            torch.equal(loaded[k].cpu(), saved[k].to(loaded[k].dtype).cpu()) for k in saved):
        return "its weights did not load"
    return None


def save_adapter(model: object, out_dir: "str | os.PathLike", base_model_name_or_path: str | None = None,
                 adapter_name: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` to `out_dir`; returns the directory.

    `model` is a `PeftModel` or what `surogate.compile` returned. `base_model_name_or_path` is
    recorded in the config (default: what PEFT knows) so that `AutoPeftModel` can find the base.
    `state_dict`: the weights to write, by parameter name (see `adapter_state_dict`).
    """
    from safetensors.torch import save_file

    peft_model = find_peft_model(model)
    name = adapter_name or peft_model.active_adapter
    state = adapter_state_dict(peft_model, name, state_dict)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft_model.peft_config[name]
    saved_base = config.base_model_name_or_path
    inference_mode = config.inference_mode
    try:
        if base_model_name_or_path is not None:
            config.base_model_name_or_path = str(base_model_name_or_path)
        config.inference_mode = True  # as PEFT saves it: loading for training is asked for explicitly
        config.save_pretrained(str(out))
    finally:
        config.base_model_name_or_path, config.inference_mode = saved_base, inference_mode
    return out


def _check_adapter_dir(adapter_dir: "str | os.PathLike") -> Path:
    d = Path(adapter_dir).expanduser()
    if not (d / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{d} holds no {ADAPTER_CONFIG}; point at a directory written by "
                                "surogate.save_adapter or PeftModel.save_pretrained")
    return d


def _load_base(model_dir: "str | os.PathLike", dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoConfig

    from surogate.training.model_class import causal_lm_class

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    return causal_lm_class(config).from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code)


def load_adapter(model: "nn.Module | str | os.PathLike", adapter_dir: "str | os.PathLike",
                 is_trainable: bool = False, dtype: torch.dtype = torch.bfloat16, trust_remote_code: bool = False):
    """A `PeftModel`: the adapter in `adapter_dir` on `model` (a module, or a model directory / hub id
    loaded in `dtype`; `trust_remote_code=True` for one that ships its own modeling code). `is_trainable=True` to
    continue training it."""
    from peft import PeftModel

    from surogate.compat import quiet_peft_deprecations

    d = _check_adapter_dir(adapter_dir)
    base = model if isinstance(model, nn.Module) else _load_base(model, dtype, trust_remote_code)
    with quiet_peft_deprecations():
        return PeftModel.from_pretrained(base, str(d), is_trainable=is_trainable)


def _copy_tokenizer(sources: list[Path], out: Path) -> None:
    for src in sources:
        files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
        if files:
            for f in files:
                shutil.copy2(f, out / f.name)
            return


# The dtypes a merged model is written in, by the names `surogate merge --dtype` takes.
MERGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def merge_dtype(dtype: "torch.dtype | str") -> torch.dtype:
    """`dtype` as a torch dtype: one of MERGE_DTYPES, by name (as the CLI takes it) or as the dtype itself.
    Checked before the merge loads anything (a name passed on to torch fails late, as a device string)."""
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in MERGE_DTYPES:
        return MERGE_DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in MERGE_DTYPES.values():
        return dtype
    raise ValueError(f"dtype: {dtype!r} is not one a merged model is written in; give one of "
                     f"{', '.join(MERGE_DTYPES)} (a name or the torch dtype)")


def merge(model_dir: "str | os.PathLike", adapter_dir: "str | os.PathLike", out_dir: "str | os.PathLike",
          dtype: "torch.dtype | str" = torch.bfloat16, trust_remote_code: bool = False) -> Path:
    """Write base + adapter as one plain Hugging Face checkpoint in `dtype` (bf16 by default; a torch dtype
    or its name: bfloat16, float16, float32).

    The merge runs in FP32 (W + scale * B @ A) and rounds once to `dtype`, so the merged model
    differs from base + adapter only by that rounding. The tokenizer is copied along when the
    model or adapter directory has one. `trust_remote_code=True` for a base that ships its own modeling code
    (its files are written beside the merged weights).
    """
    dtype = merge_dtype(dtype)
    d = _check_adapter_dir(adapter_dir)
    out = Path(out_dir)
    merged = load_adapter(model_dir, d, dtype=torch.float32, trust_remote_code=trust_remote_code)
    merged = merged.merge_and_unload()
    merged = merged.to(dtype)
    merged.config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    _copy_tokenizer([p for p in (Path(str(model_dir)).expanduser(), d) if p.is_dir()], out)
    return out
