"""What a run trains, built from its config: the tokenizer, the frozen base model, LoRA compiled for the
recipe, the optimizer and the learning-rate schedule.

These are public so that the examples build the same pieces and write the loop by hand
(examples/finetune_gsm8k.py, bench/fidelity.py); `compile_model` is the one place the trainer calls
`surogate.compile`. The loop itself is `surogate/training/train.py`.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from surogate.training.config import ConfigError, TrainConfig
from surogate.training.train_checks import is_local_model, vocab_message

Log = Callable[[str], None]


def log_stderr(line: str) -> None:
    """The default `Log`: one line to stderr, flushed (stdout stays free for a command's result)."""
    print(line, file=sys.stderr, flush=True)


def set_seed(seed: int) -> None:
    """Seed Python's and torch's generators (the LoRA init, the data order and dropout draw from them)."""
    random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    """The GPU when there is one, else the CPU (one process; several take `distributed.init`'s device)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# --- model and tokenizer -------------------------------------------------------------------------

def load_tokenizer_for(cfg: TrainConfig, log: Log = log_stderr):
    """The tokenizer for `cfg`: explicit > the model directory's own > the embedded default."""
    from surogate.training.tokenizer import has_tokenizer_files

    if cfg.tokenizer is not None or cfg.model == "default":
        return _load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    if is_local_model(cfg.model) and not has_tokenizer_files(Path(cfg.model).expanduser()):
        log(f"{cfg.model} has no tokenizer; using the embedded default (set `tokenizer:` to choose one)")
        return _load_tokenizer(None, False)
    return _load_tokenizer(cfg.model, cfg.trust_remote_code)


def _load_tokenizer(name: str | None, trust_remote_code: bool):
    """`load_tokenizer`, with a tokenizer of its own code refused in one line without `trust_remote_code`."""
    from surogate.training import remote_code
    from surogate.training.tokenizer import load_tokenizer

    if name not in (None, "default") and not trust_remote_code and remote_code.tokenizer_needs_remote_code(name):
        raise ConfigError(remote_code.refusal("tokenizer", name, tokenizer=True))
    return load_tokenizer(name, trust_remote_code=trust_remote_code)


def embedded_model_config(tokenizer=None):
    """The embedded tiny Qwen3 config (surogate/data/qwen3-tiny.json) sized to `tokenizer` (None: as stored)."""
    from transformers import Qwen3Config

    from surogate.training.data_files import package_data_dir

    raw = json.loads((package_data_dir() / "qwen3-tiny.json").read_text())
    if tokenizer is not None:
        raw.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return Qwen3Config(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})


def load_base_model(cfg: TrainConfig, tokenizer, seed: int | None = None) -> nn.Module:
    """The frozen base in bf16: random weights for the embedded default, else from_pretrained."""
    from transformers import AutoModelForCausalLM

    if cfg.model == "default":
        torch.manual_seed(cfg.seed if seed is None else seed)
        model = AutoModelForCausalLM.from_config(embedded_model_config(tokenizer), dtype=torch.bfloat16)
    else:
        from transformers import AutoConfig

        from surogate.training.model_class import causal_lm_class

        source = str(Path(cfg.model).expanduser()) if is_local_model(cfg.model) else cfg.model
        trust = cfg.trust_remote_code  # the folder's own code runs only when the config says so (remote_code.py)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
        model = causal_lm_class(config).from_pretrained(source, dtype=torch.bfloat16, trust_remote_code=trust)
        model = _dequantized(model, cfg.model)
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:  # train_checks.check_vocab refuses it from the config; here for a config without
        raise ConfigError(vocab_message(len(tokenizer), vocab, cfg))  # vocab_size, or a caller that skips it
    return model


def _dequantized(model: nn.Module, name: str) -> nn.Module:
    """`model` in bf16 where its checkpoint is stored quantized (a "-bnb-4bit" upload, an FP8 one): transformers
    loads such a checkpoint quantized whatever `dtype` says, and surogate's recipes quantize bf16 weights
    themselves (`qnf4` is bitsandbytes' NF4), so the weights go back to bf16 on the host first."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    method = getattr(quantizer.quantization_config, "quant_method", "a quantization_config")
    method = str(getattr(method, "value", method))  # transformers' QuantizationMethod enum: "bitsandbytes", "fp8"
    try:
        model = model.dequantize(dtype=torch.bfloat16)
    except Exception as e:  # a method transformers cannot undo (GPTQ, AWQ, ...)
        raise ConfigError(f"model: {name} is stored quantized ({method}), which transformers cannot turn back "
                          f"into bf16 ({str(e).splitlines()[0]}); point `model` at the unquantized checkpoint "
                          "(the recipe quantizes it)") from None
    print(f"note: {name} is stored quantized ({method}): dequantized to bf16 on load; the recipe "
          "quantizes it itself")
    return model.to(torch.bfloat16)


def lora_config(cfg: TrainConfig, model: nn.Module | None = None):
    """The PEFT LoraConfig the run trains (rank, alpha, dropout, targets from `cfg`). With `model`, a MoE
    model's experts get one LoRA pair each unless `lora_target_parameters` says otherwise."""
    from peft import LoraConfig

    from surogate import moe
    from surogate.compiler import DEFAULT_TARGETS, default_exclude, default_targets

    targets = cfg.lora_target_modules
    exclude = None
    if model is not None and list(targets) == list(DEFAULT_TARGETS):  # the default: the model's own, as compile's
        targets = default_targets(model)  # (those it has, with the names its blocks give their other projections)
        exclude = default_exclude(model, targets)  # none outside the decoder blocks (a vision tower)
    parameters = cfg.lora_target_parameters
    if parameters is None:
        parameters = moe.expert_target_parameters(model) if model is not None else []
    if parameters and cfg.lora_dropout:
        parameters = []  # PEFT refuses dropout on a targeted parameter: the experts then train no LoRA
        print("note: lora_dropout > 0, so the MoE experts get no LoRA (PEFT cannot drop out an expert's "
              "input); set lora_dropout: 0 to train them")
    return LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
        target_modules="all-linear" if targets == ["all-linear"] else list(targets), task_type="CAUSAL_LM",
        target_parameters=list(parameters) or None, exclude_modules=exclude,
    )


def compile_model(model: nn.Module, cfg: TrainConfig, log: Log = log_stderr) -> nn.Module:
    """The single integration point with `surogate.compile`: attach LoRA (new, or the adapter in `lora_model_dir`,
    its weights loaded: `start_adapter.attach`) and compile for the recipe."""
    from surogate.compiler import compile as surogate_compile

    recompute = cfg.recompute_producers
    if recompute == "auto" and not cfg.sample_packing:
        recompute = True  # padded batches vary in length: "auto" would weigh the first one's, not the longest's
    options = {"checkpoint": cfg.gradient_checkpointing, "checkpoint_fraction": cfg.gradient_checkpointing_fraction,
               "recompute_producers": recompute, "save_fp8_inputs": cfg.save_fp8_inputs}
    if cfg.lora_model_dir is not None:
        from surogate.training import start_adapter

        model, lora = start_adapter.attach(model, cfg, log), None
    else:
        lora = lora_config(cfg, model)
    return surogate_compile(model, recipe=cfg.recipe, lora=lora, arch=cfg.arch,
                            allow_emulation=cfg.allow_emulation, **options)


# --- optimizer and schedule ----------------------------------------------------------------------

def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters; LoRA was not attached "
                           "(check lora_target_modules against the model's module names)")
    return params


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable (LoRA) parameters only; the fused CUDA kernel (one launch for every
    parameter) when they live on a GPU."""
    params = trainable_parameters(model)
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused)


def lr_factor(step: int, kind: str, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier at optimizer `step` (0-based): linear warmup, then decay to 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}; use linear, cosine or constant")


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, kind, warmup_steps, total_steps))
