"""Training throughput and memory of surogate against its peers (DESIGN.md section 5).

    python bench/tps.py --models 0.6B,8B                      # every system that runs here
    python bench/tps.py --models 0.6B --systems hf_eager,surogate:qfp8 --steps 6
    python bench/tps.py --models Gemma-2-2B,Phi-3-mini --systems hf_compile,surogate:bf16

Each (model, system) runs in its own subprocess, so that one crash, OOM or compile cache does
not leak into the next. Models are built from their published configs with random weights (no
download), directly on the GPU in bf16; LoRA r=16, alpha=32 on the 7 projections (Phi-3: its 4 linears,
q/k/v and gate/up being fused; MoE: attention + every expert); batch 2 x seq 2048 packed (random token ids:
throughput does not depend on the text), grad accumulation 4; AdamW. tokens/s = batch * seq * accum / median
wall time of an optimizer step after warm-up.
Models (--models keys; records name them as in brackets):
- Qwen3 dense by size: 0.6B, 1.7B, 4B, 8B, 14B ("Qwen3-0.6B", ...);
- Qwen3 MoE 30B-A3B ("Qwen3-30B-A3B"; LoRA on attention + every expert via PEFT target_parameters; peers
  hf_eager, hf_compile, with HF's grouped_mm experts);
- other architectures by their full name: Llama-3-8B, Llama-3.1-8B, Llama-3.2-1B, Mistral-7B (v0.3),
  Gemma-2-2B (HF runs it with eager attention: SDPA has no logit soft-capping), Phi-3-mini (4k);
- your own model: a local directory holding its config.json (or the file's path), e.g. a snapshot of a
  hub model; only the config is read (random weights, as above), and the record is named after the
  directory. LoRA trains the default targets the model has (surogate.compiler.DEFAULT_TARGETS: the 7
  projections, or fused qkv_proj / gate_up_proj) and, in a mixture of experts, every expert.
Liger runs each architecture's own patch (LIGER); one without is skipped. A worker that runs out of
GPU memory is recorded as "OOM".
Writes bench/results/tps.json (one record per measurement: model, system, recipe, emulated,
tokens_per_s, peak_gib, first_step_s, losses, GPU, versions, commit), tps.md (with the speed-up over
the best peer; emulated recipes labelled) and tps.png. Peers that cannot be imported are skipped
with the reason; missing packages travel as wheels (bench/NOTES.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Qwen3 dense configs (hidden, intermediate, layers, heads, kv heads, tied embeddings).
QWEN3 = {
    "0.6B": (1024, 3072, 28, 16, 8, True),
    "1.7B": (2048, 6144, 28, 16, 8, True),
    "4B": (2560, 9728, 36, 32, 8, True),
    "8B": (4096, 12288, 36, 32, 8, False),
    "14B": (5120, 17408, 40, 40, 8, False),
}
# Qwen3 MoE configs (transformers.Qwen3MoeConfig fields): every layer sparse (no dense MLP layers).
QWEN3_MOE = {
    "30B-A3B": {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "tie_word_embeddings": False},
}
# LoRA of an MoE model: the attention projections, and each expert's slice of the fused 3-D expert weights
# (PEFT target_parameters: one A/B pair per expert), since the experts are parameters, not nn.Linear.
MOE_TARGETS = TARGETS[:4]
MOE_TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# Other architectures, by their published name: (transformers config class, the fields of the model's
# config.json that shape it; the class defaults give the rest: activation, biases, dropout 0).
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5,
             "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "max_position_embeddings": 8192,
             "tie_word_embeddings": False}
# Llama 3.1 and 3.2: the same theta, long-context frequency scaling (factor 8; 3.2: 32).
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
ARCHS = {
    "Llama-3-8B": ("LlamaConfig", LLAMA3_8B),  # bench/sft.py's "llama3-8B"
    "Llama-3.1-8B": ("LlamaConfig", {**LLAMA3_8B, "rope_parameters": LLAMA31_ROPE, "max_position_embeddings": 131072}),
    "Llama-3.2-1B": ("LlamaConfig", {**LLAMA3_8B, "hidden_size": 2048, "intermediate_size": 8192,
                                     "num_hidden_layers": 16, "head_dim": 64, "max_position_embeddings": 131072,
                                     "rope_parameters": {**LLAMA31_ROPE, "factor": 32.0}, "tie_word_embeddings": True}),
    "Mistral-7B": ("MistralConfig", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                                     "vocab_size": 32768, "rms_norm_eps": 1e-5, "sliding_window": None,
                                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                                     "max_position_embeddings": 32768, "tie_word_embeddings": False}),
    "Gemma-2-2B": ("Gemma2Config", {"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                                    "vocab_size": 256000, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                                    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
                                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                                    "max_position_embeddings": 8192, "tie_word_embeddings": True}),
    # Gemma-3-1B (text only): one kv head of dim 256, a 512-token sliding window on 5 layers of 6 (their own RoPE
    # theta: the class defaults), no soft-capping, a 262k vocabulary.
    "Gemma-3-1B": ("Gemma3TextConfig", {"hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
                                        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                                        "vocab_size": 262144, "query_pre_attn_scalar": 256, "sliding_window": 512,
                                        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
                                        "max_position_embeddings": 32768, "tie_word_embeddings": True}),
    # Phi-3-mini-4k: multi-head attention (32 kv heads), q/k/v and gate/up each one fused linear; its
    # config.json's 2047-token sliding window kept (at seq 2048 the first token drops out of the last's).
    "Phi-3-mini": ("Phi3Config", {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                                  "rms_norm_eps": 1e-5, "sliding_window": 2047,
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                                  "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
                                  "pad_token_id": 32000, "bos_token_id": 1, "eos_token_id": 32000,
                                  "tie_word_embeddings": False}),
}
MODEL_KEYS = [*QWEN3, *QWEN3_MOE, *ARCHS]
# Liger-Kernel's patch of each architecture (by config.model_type); one not here is skipped.
LIGER = {"qwen3": "apply_liger_kernel_to_qwen3", "llama": "apply_liger_kernel_to_llama",
         "mistral": "apply_liger_kernel_to_mistral", "gemma2": "apply_liger_kernel_to_gemma2",
         "phi3": "apply_liger_kernel_to_phi3", "gemma3_text": "apply_liger_kernel_to_gemma3_text"}
PEERS = ["hf_eager", "hf_compile", "liger", "bnb_nf4"]
# Peers that only exist for dense models here, and why (a skipped (model, system), not a failure).
MOE_UNSUPPORTED = {
    "bnb_nf4": "dense only: bnb Linear4bit quantizes nn.Linear, the experts are fused 3-D parameters",
}
SUROGATE_RECIPES = ["bf16", "fp8", "qfp8", "qfp8-bf16", "qnf4", "fp4", "qfp4"]


def qwen3_config(size: str):
    from transformers import Qwen3Config

    hidden, inter, layers, heads, kv, tied = QWEN3[size]
    return Qwen3Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, vocab_size=151936,
                       max_position_embeddings=32768, tie_word_embeddings=tied, torch_dtype="bfloat16")


def is_moe(size: str | None) -> bool:
    """A mixture of experts: the Qwen3 MoE sizes, or a local config whose model has expert stacks."""
    return size is not None and (size in QWEN3_MOE or (local_config_dir(size) is not None
                                                        and bool(_meta_layout(size)[1])))


def local_config_dir(key: str) -> Path | None:
    """The directory of a --models key that is a local model (a directory with config.json, or that file)."""
    path = Path(key).expanduser()
    path = path.parent if path.name == "config.json" else path
    return path.resolve() if (path / "config.json").is_file() else None


@functools.lru_cache(maxsize=None)
def _meta_layout(key: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """(the last names of the model's nn.Linear modules, PEFT target_parameters for its experts): the model
    built on the meta device from its config, no memory and no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from surogate.moe import expert_target_parameters

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(key))
    linears = frozenset(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    return linears, tuple(expert_target_parameters(model))


def qwen3_moe_config(size: str):
    """The MoE config, with HF's "grouped_mm" experts (one grouped GEMM over all experts). transformers 5.17+
    defaults to it but silently falls back to the per-expert loop where it cannot; requested, it raises instead."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**QWEN3_MOE[size], vocab_size=151936, max_position_embeddings=32768,
                          torch_dtype="bfloat16", experts_implementation="grouped_mm")


def arch_config(name: str, **overrides) -> PretrainedConfig:
    """The config of an ARCHS model; `overrides` replace published fields (the CPU tests shrink it)."""
    import transformers

    cls, fields = ARCHS[name]
    return getattr(transformers, cls)(**{**fields, **overrides}, torch_dtype="bfloat16")


def model_spec(key: str) -> tuple[str, PretrainedConfig]:
    """(record name, config) of a --models key: the one place a key is resolved, so that records, traces and
    the model built agree. Qwen3 keys are sizes ("0.6B" is "Qwen3-0.6B"); ARCHS keys are their own names."""
    if key in QWEN3:
        return f"Qwen3-{key}", qwen3_config(key)
    if key in QWEN3_MOE:
        return f"Qwen3-{key}", qwen3_moe_config(key)
    if key in ARCHS:
        return key, arch_config(key)
    local = local_config_dir(key)
    if local is not None:
        from transformers import AutoConfig

        return local.name, AutoConfig.from_pretrained(local, local_files_only=True)
    raise ValueError(f"unknown model {key!r}; known: {', '.join(MODEL_KEYS)}, or a directory with a config.json")


def model_name(key: str) -> str:
    """The name records, tables and traces give model `key` ("Qwen3-0.6B", "Gemma-2-2B")."""
    return model_spec(key)[0]


def model_config(key: str) -> PretrainedConfig:
    """The config of any --models key: a size of QWEN3 (dense) or QWEN3_MOE, a name of ARCHS, a local model."""
    return model_spec(key)[1]


def lora_targets(size: str | None = None) -> list[str]:
    """The linears LoRA trains on `size`: TARGETS without a size; else those of surogate's default targets
    the model has (the 7 projections, or Phi-3's fused qkv_proj / gate_up_proj), as surogate.compile and
    `surogate train` choose them; in an MoE model the experts come on top (lora_config)."""
    from surogate.compiler import DEFAULT_TARGETS

    if size is None:
        return TARGETS
    if size in QWEN3_MOE:
        return MOE_TARGETS
    linears = _meta_layout(size)[0]
    found = [t for t in DEFAULT_TARGETS if t in linears]
    if not found:
        raise ValueError(f"{model_name(size)} has none of the default LoRA targets ({', '.join(DEFAULT_TARGETS)}) "
                         "among its linear layers")
    return found


def expert_parameters(size: str) -> list[str]:
    """PEFT target_parameters of an MoE model's experts: one LoRA pair per expert on both stacks."""
    return MOE_TARGET_PARAMETERS if size in QWEN3_MOE else list(_meta_layout(size)[1])


def lora_config(size: str | None = None):
    """The LoRA every system of the benchmark trains on `size` (r=16 on its lora_targets; and the experts
    of an MoE model), so that they train the same thing."""
    from peft import LoraConfig

    experts = {"target_parameters": expert_parameters(size)} if is_moe(size) else {}
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=lora_targets(size), **experts,
                      task_type="CAUSAL_LM")


def _to_nf4(model, targets: list[str]):
    """Swap the LoRA target linears for bitsandbytes Linear4bit (NF4, double quantization), as QLoRA does."""
    import bitsandbytes as bnb
    import torch

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(module, child_name, q.cuda())
    return model


def _host_model(config):
    """The model in bf16 in host memory, as `from_pretrained` leaves it before `surogate.compile` moves it.
    Random weights are drawn on the GPU one tensor at a time and copied back: the host's `normal_` is
    single-threaded (about 150 s for 30B-A3B's 30.5B values), a GPU's takes seconds and holds one tensor."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # transformers' own init skipped; norms and rotary buffers keep their __init__ values
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:  # embeddings, projections, routers, expert stacks
                param.copy_(torch.randn(param.shape, device=device, dtype=param.dtype, generator=g).mul_(0.02))
            elif name.endswith("bias"):
                param.zero_()  # 1-D norm weights keep their torch.ones
    return model


# Suffixes of a surogate system name, for ablations: "surogate:bf16+whole" compiles the whole backbone,
# "+nograph" drives the model eagerly instead of through surogate.GraphedStep (the default),
# "+ckpt" recomputes each decoder block in the backward (activation checkpointing), "+offload" recomputes too and
# keeps the blocks' saved inputs in pinned host memory between forward and backward (checkpoint="offload"); a
# percentage after either checkpoints only that share of the blocks, the first ones ("+ckpt67", "+offload75":
# checkpoint_fraction=0.67, 0.75; the rest keep their activations),
# "+norecompute" keeps the norm / SwiGLU / RoPE outputs and layout copies that recompute_producers (on by default)
# rebuilds in the backward ("+recompute" asks for it explicitly), "+gradproducer" fuses the FP8 dgrad's gradient
# quantize into the kernel producing the gradient (grad_producer=True, on by default; "+nogradproducer" off), "+cpuload"
# builds the model on the host and lets surogate.compile move it to the GPU one target at a time, quantized on the
# way (what a GPU too small for the bf16 model needs; peak_gib then is the real peak of the whole run; without it
# peak_gib includes the bf16 build, train_peak_gib does not), "+nopersistent" keeps the sm_90 GEMMs off the persistent
# TMA kernel (variants.PERSISTENT_SM90 = False: the routes before it), "+persistent" sends every variant it runs to it,
# "+combo" turns on Inductor's combo kernels (independent small kernels, e.g. the LoRA factors' casts, in one launch),
# "+fp8cublas" / "+fp8cublasdgrad" send the row-scaled fp8 GEMMs (forward and dgrad / the dgrad only) to cuBLAS's
# `_scaled_mm` + a LoRA addmm_ on sm_90 where the persistent kernel does not take them (variants.FP8_ROW_CUBLAS, off
# by default; with "+nopersistent" at 8B: runs 68, 71), "+catmasked" leaves every cat to Inductor's own lowering (the
# fused gate/up and q/k/v GEMMs' gradient cats as one masked pointwise kernel; surogate/passes/concat.py), "+noswiglu"
# leaves qfp8's SwiGLU product as the model wrote it (its backward and the gate/up gradient's quantize to Inductor, two
# kernels a layer, where surogate::swiglu_backward is one: surogate/passes/swiglu.py), "+graphgradquantize" keeps qfp8's
# quantize of a gradient no kernel produces (q/k/v's cat, down_proj's graph input) in the backward graph (Inductor's
# kernel reading it back) instead of the op's Triton quantizer (surogate/passes/op_grad_quantize.py).
# (Run 126 measured "+catgraphquantize", that pass when it took cats only.) "+noswiglufwd" leaves qfp8's SwiGLU
# forward and the quantize of h for down_proj to Inductor (two kernels a layer) where surogate::swiglu_forward writes
# both in one (surogate/passes/swiglu.py FORWARD_OP; run 133 measured it as "+swiglufwd", then off by default).
# "+nogeglu" leaves Gemma's GeGLU MLP (the tanh GELU) to Inductor in qfp8 where swiglu.GEGLU (on by default since run
# 138, where it was measured as "+geglu") gives it the same ops.
# "+savefp8" keeps the FP8 copy of each FP8-forward LoRA linear's input for the backward (save_fp8_inputs=True, off by
# default; "+nosavefp8" off explicitly; passes/save_fp8.py).
# "+addmm" adds the LoRA term after a cuBLAS GEMM (qfp8's block-scaled GEMMs on sm_90) by cuBLAS's addmm_, as before
# kernels/lora_add.py (cublas.LORA_ADD_KERNEL = False). "+pad128" (bench/sft.py's padded modes) pads each batch to a
# multiple of 128 tokens instead of the CUDA graph lengths chosen from the data (training/buckets.py).
SUROGATE_OPTIONS = {"whole": {"regional": False}, "nohz": {"horizontal": False}, "noproducer": {"producer": False},
                    "ckpt": {"checkpoint": True}, "offload": {"checkpoint": "offload"},
                    "nograph": {"cuda_graphs": False}, "cpuload": {"cpu_load": True},
                    "recompute": {"recompute_producers": True}, "norecompute": {"recompute_producers": False},
                    "gradproducer": {"grad_producer": True}, "nogradproducer": {"grad_producer": False},
                    "persistent": {"persistent_sm90": True}, "nopersistent": {"persistent_sm90": False},
                    "combo": {"combo_kernels": True},
                    "fp8cublas": {"fp8_row_cublas": ("ROW_FP8_FWD_SM90", "ROW_FP8_DGRAD_SM90")},
                    "fp8cublasdgrad": {"fp8_row_cublas": ("ROW_FP8_DGRAD_SM90",)},
                    "catmasked": {"cat_slices": False}, "noswiglu": {"swiglu_op": False},
                    "graphgradquantize": {"op_grad_quantize": False}, "noswiglufwd": {"swiglu_forward_op": False},
                    "geglu": {"geglu": True}, "nogeglu": {"geglu": False}, "savefp8": {"save_fp8_inputs": True},
                    "nosavefp8": {"save_fp8_inputs": False}, "addmm": {"lora_add_kernel": False},
                    "pad128": {"data_buckets": False}}
# Read by build() / the worker, not surogate.compile options.
DRIVER_OPTIONS = ("cuda_graphs", "cpu_load", "persistent_sm90", "combo_kernels", "fp8_row_cublas", "cat_slices",
                  "swiglu_op", "op_grad_quantize", "swiglu_forward_op", "geglu", "lora_add_kernel", "data_buckets")


# "+ckpt67" / "+offload75": checkpointing of the first 67% / 75% of the blocks (1 to 99).
PARTIAL_CHECKPOINT = re.compile(r"^(ckpt|offload)([1-9][0-9]?)$")


def surogate_system(system: str) -> tuple[str, dict]:
    """("bf16", {"regional": False}) for "surogate:bf16+whole": the recipe and surogate.compile options."""
    recipe, *flags = system.split(":", 1)[1].split("+")
    options: dict = {}
    for flag in flags:
        partial = PARTIAL_CHECKPOINT.match(flag)
        if partial:
            options.update(SUROGATE_OPTIONS[partial[1]], checkpoint_fraction=int(partial[2]) / 100)
            continue
        if flag not in SUROGATE_OPTIONS:
            raise ValueError(f"unknown option +{flag} in {system!r}; known: {', '.join(SUROGATE_OPTIONS)} "
                             "(+ckpt and +offload also with a percentage of the blocks, e.g. +ckpt67)")
        options.update(SUROGATE_OPTIONS[flag])
    return recipe, options


def build(size: str, system: str):
    """The model a system trains, ready for `model(input_ids=..., labels=...)`."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    if unsupported(size, system):
        raise ValueError(f"{system} on {model_name(size)}: {unsupported(size, system)}")
    if system == "liger":
        apply_liger(model_config(size).model_type)
    torch.manual_seed(0)
    cpu_load = system.startswith("surogate:") and surogate_system(system)[1].get("cpu_load", False)
    if cpu_load:
        model = _host_model(model_config(size))
    else:  # allocated on the GPU in bf16: 30B-A3B's 61 GB never exist on the host
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(model_config(size), torch_dtype=torch.bfloat16)
    if system == "bnb_nf4":
        model = _to_nf4(model, lora_targets(size))
    if system.startswith("surogate:"):
        import surogate

        recipe, options = surogate_system(system)
        from surogate.kernels import variants

        if "persistent_sm90" in options:  # this worker process only
            variants.PERSISTENT_SM90 = options["persistent_sm90"]
        if "cat_slices" in options:  # this worker process only
            from surogate.passes import concat

            concat.ENABLED = options["cat_slices"]
        if "swiglu_op" in options:  # this worker process only
            from surogate.passes import swiglu

            swiglu.ENABLED = options["swiglu_op"]
        if "swiglu_forward_op" in options:  # this worker process only
            from surogate.passes import swiglu

            swiglu.FORWARD_OP = options["swiglu_forward_op"]
        if "geglu" in options:  # this worker process only
            from surogate.passes import swiglu

            swiglu.GEGLU = options["geglu"]
        if "op_grad_quantize" in options:  # this worker process only
            from surogate.passes import op_grad_quantize

            op_grad_quantize.ENABLED = options["op_grad_quantize"]
        if "lora_add_kernel" in options:  # this worker process only
            from surogate.kernels import cublas

            cublas.LORA_ADD_KERNEL = options["lora_add_kernel"]
        if "fp8_row_cublas" in options:  # this worker process only
            variants.FP8_ROW_CUBLAS = frozenset(variants.CublasRule[rule] for rule in options["fp8_row_cublas"])
        if options.get("combo_kernels"):  # this worker process only; part of Inductor's cache key
            import torch._inductor.config as inductor_config

            inductor_config.combo_kernels = True
        for option in DRIVER_OPTIONS:
            options.pop(option, None)
        # Emulated recipes (FP4 without FP4 tensor cores) are measured too, labelled in the results.
        return surogate.compile(model, recipe=recipe, lora=lora_config(size), allow_emulation=True, **options)
    model = get_peft_model(model, lora_config(size))
    if system == "hf_compile":
        model = torch.compile(model)
    return model


def apply_liger(model_type: str) -> None:
    """Patch transformers' modules of `model_type` with Liger's kernels (before the model is built)."""
    import importlib

    getattr(importlib.import_module("liger_kernel.transformers"), LIGER[model_type])()


def micro_step_fn(model, system: str, accum: int):
    """`ids -> loss`: forward + backward of one micro-batch (loss / accum). surogate systems replay it
    from a CUDA graph (surogate.GraphedStep) unless "+nograph"; peers run it eagerly."""
    if system.startswith("surogate:") and surogate_system(system)[1].get("cuda_graphs", True):
        from surogate.training.graphed_step import GraphedStep

        graphed = GraphedStep(model, loss_scale=1 / accum)
        return lambda ids: graphed(input_ids=ids, labels=ids)

    def eager(ids):
        loss = model(input_ids=ids, labels=ids).loss
        (loss / accum).backward()
        return loss.detach()

    return eager


def worker(size: str, system: str, steps: int, warmup: int, batch: int, seq: int, accum: int) -> dict:
    import torch

    from surogate.compat import import_bitsandbytes_offline

    import_bitsandbytes_offline()  # the peers import PEFT, which imports bitsandbytes: no Hub fetch there either
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = build(size, system)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    vocab = model_config(size).vocab_size
    batches = [torch.randint(0, vocab, (batch, seq), device="cuda", generator=g) for _ in range(accum)]

    micro_step = micro_step_fn(model, system, accum)
    build_peak_gib = torch.cuda.max_memory_allocated() / 2**30  # the model built in bf16, then quantized
    torch.cuda.reset_peak_memory_stats()  # from here: what training itself holds
    times, losses = [], []
    first_step_s = None
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step_losses = [micro_step(ids).clone() for ids in batches]
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        if first_step_s is None:
            first_step_s = t1 - start
        if step >= warmup:
            times.append(t1 - t0)
        losses.append(float(torch.stack(step_losses).mean()))
    median = statistics.median(times)
    return {
        "model": model_name(size), "system": system, "tokens_per_s": batch * seq * accum / median,
        "step_s": median, "peak_gib": max(build_peak_gib, torch.cuda.max_memory_allocated() / 2**30),
        "train_peak_gib": torch.cuda.max_memory_allocated() / 2**30, "first_step_s": first_step_s,
        "loss_first": losses[0], "loss_last": losses[-1], "finite": all(map(math.isfinite, losses)),
        "steps": warmup + steps,
    }


def environment() -> dict:
    from surogate.training.info import run_record

    return run_record(str(Path(__file__).resolve().parent))


def available(system: str) -> str | None:
    """None if `system` can run here, else why not."""
    import importlib.util

    needs = {"liger": "liger_kernel", "bnb_nf4": "bitsandbytes"}.get(system)
    if needs and importlib.util.find_spec(needs) is None:
        return f"{needs} is not installed"
    if system.startswith("surogate:"):
        from surogate.kernels.plan import Support, plan

        p = plan(surogate_system(system)[0])
        if p.support is Support.REFUSED:
            return p.explain()
    return None


def unsupported(size: str, system: str) -> str | None:
    """None if `system` can train model `size`, else why not (MoE models: the peers that are dense only;
    Liger on an architecture it has no patch for)."""
    if is_moe(size) and system in MOE_UNSUPPORTED:
        return MOE_UNSUPPORTED[system]
    model_type = model_config(size).model_type
    if system == "liger" and model_type not in LIGER:
        return f"no Liger patch wired up for {model_type} (bench/tps.py LIGER)"
    return None


OOM_SIGNS = ("OutOfMemoryError", "CUDA out of memory", "CUDA error: out of memory")


def failure(returncode: int, stderr: str) -> str:
    """The error of a worker that failed: "OOM" when the GPU ran out of memory (a result: the system does not
    fit this model and shape), else how it ended. Only the end of stderr counts (the final traceback), so that
    an OOM caught and retried earlier (an autotuning candidate) does not mark a later, other failure."""
    tail = stderr.strip()[-4000:]
    if any(sign in tail for sign in OOM_SIGNS):
        return "OOM"
    if returncode < 0:
        return f"killed by signal {-returncode}" + (" (host out of memory?)" if returncode == -9 else "")
    return tail[-400:]


PEER_RECIPES = {"hf_eager": "bf16", "hf_compile": "bf16", "liger": "bf16", "bnb_nf4": "nf4 (bitsandbytes)"}


def recipe_of(system: str) -> tuple[str, bool]:
    """(recipe, emulated): what the system trains in, and whether this GPU runs it emulated
    (NVFP4 recipes without FP4 tensor cores: measured, and labelled so in the tables)."""
    if not system.startswith("surogate:"):
        return PEER_RECIPES.get(system, "?"), False
    from surogate.kernels.plan import Support, plan

    recipe = surogate_system(system)[0]
    return recipe, plan(recipe).support is Support.EMULATED


def system_order(system: str) -> tuple:
    """Peers first (PEERS order), then surogate recipes (SUROGATE_RECIPES order), each before its variants."""
    if not system.startswith("surogate:"):
        return (0, PEERS.index(system) if system in PEERS else len(PEERS), system)
    recipe, *flags = system.split(":", 1)[1].split("+")
    rank = SUROGATE_RECIPES.index(recipe) if recipe in SUROGATE_RECIPES else len(SUROGATE_RECIPES)
    return (1, rank, len(flags), system)


def write_results(records: list[dict], skipped: dict[str, str], env: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tps.json").write_text(json.dumps({"environment": env, "skipped": skipped, "records": records}, indent=2))
    models = list(dict.fromkeys(r["model"] for r in records))
    systems = sorted(dict.fromkeys(r["system"] for r in records), key=system_order)
    by = {(r["model"], r["system"]): r for r in records}
    emulated = {r["system"] for r in records if r.get("emulated")}
    lines = [(f"# Training throughput ({env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
              f"commit {env['commit']})"), "", "tokens/s (peak GiB, first step s)", "",
             "| model | " + " | ".join(s + (" (emulated)" if s in emulated else "") for s in systems) + " |",
             "|---|" + "---|" * len(systems)]
    for m in models:
        cells = []
        for s in systems:
            r = by.get((m, s))
            cells.append("-" if r is None else "OOM" if r.get("error") == "OOM" else "-" if "error" in r else
                         f"{r['tokens_per_s'] / 1e3:.1f}k ({r['peak_gib']:.1f}, {r['first_step_s']:.0f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Speed-up of each surogate recipe over the best peer measured in this run:", ""]
    for m in models:
        peers = [by[(m, s)]["tokens_per_s"] for s in PEERS if (m, s) in by and "error" not in by[(m, s)]]
        if not peers:
            continue
        for s in systems:
            r = by.get((m, s))
            if s.startswith("surogate:") and r and "error" not in r:
                lines.append(f"- {m} {s}: {r['tokens_per_s'] / max(peers):.2f}x")
    commits = sorted({r.get("commit", "?") for r in records})
    if len(commits) > 1:
        lines += ["", "Records come from several commits (the `commit` of each record in tps.json): "
                  + ", ".join(commits) + "."]
    errors = [r for r in records if "error" in r]
    if errors or skipped:
        lines += ["", "Not measured:", ""]
        lines += [f"- {r['model']} {r['system']}: {r['error']}" for r in errors]
        lines += [f"- {k}: {v}" for k, v in skipped.items()]
    (out / "tps.md").write_text("\n".join(lines) + "\n")
    _plot(records, out / "tps.png")


def _plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "error" not in r]
    if not ok:
        return
    models = list(dict.fromkeys(r["model"] for r in ok))
    systems = list(dict.fromkeys(r["system"] for r in ok))
    cols = min(2, len(models))
    rows_n = -(-len(models) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(1.2 + 0.55 * len(systems) * cols, 4.2 * rows_n), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, models):
        rows = [r for r in ok if r["model"] == m]
        ax.bar([r["system"] for r in rows], [r["tokens_per_s"] / 1e3 for r in rows],
               color=["tab:orange" if r["system"].startswith("surogate") else "tab:gray" for r in rows])
        ax.set_title(m)
        ax.set_ylabel("k tokens/s")
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _previous_records(path: Path) -> list[dict]:
    return json.loads(path.read_text())["records"] if path.is_file() else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="0.6B", help=f"comma list of Qwen3 sizes ({', '.join([*QWEN3, *QWEN3_MOE])}), "
                   f"other models by name ({', '.join(ARCHS)}) and local model directories (their config.json)")
    p.add_argument("--systems", default="all", help="comma list of peers and surogate:<recipe>, or 'all'")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--timeout", type=int, default=900, help="seconds per (model, system) subprocess")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--append", action="store_true",
                   help="keep the records already in --out/tps.json (a re-measured (model, system) replaces its own)")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "SYSTEM"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = {"steps": args.steps, "warmup": args.warmup, "batch": args.batch, "seq": args.seq, "accum": args.accum}

    if args.worker:
        print(json.dumps(worker(*args.worker, **shape)))
        return 0

    systems = PEERS + [f"surogate:{r}" for r in SUROGATE_RECIPES] if args.systems == "all" \
        else args.systems.split(",")
    sizes = args.models.split(",")
    for size in sizes:
        model_config(size)  # an unknown size fails here, not in every worker
    env = environment()
    records, skipped = (_previous_records(args.out / "tps.json") if args.append else []), {}
    for system in systems:
        why = available(system)
        if why:
            skipped[system] = why
            print(f"skip {system}: {why}", flush=True)
    for size in sizes:
        for system in [s for s in systems if s not in skipped]:
            why = unsupported(size, system)
            if why:
                skipped[f"{model_name(size)} {system}"] = why
                print(f"skip {model_name(size)} {system}: {why}", flush=True)
    for size in sizes:
        name = model_name(size)
        for system in [s for s in systems if s not in skipped and f"{name} {s}" not in skipped]:
            cmd = [sys.executable, __file__, "--worker", size, system] + \
                  [f"--{k}={v}" for k, v in shape.items()]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
                last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
                record = json.loads(last) if done.returncode == 0 else \
                    {"model": name, "system": system, "error": failure(done.returncode, done.stderr)}
                if record.get("error") == "OOM":  # the allocation that failed, and what was in use
                    record["detail"] = done.stderr.strip().splitlines()[-1][-400:]
            except subprocess.TimeoutExpired:
                record = {"model": name, "system": system, "error": f"timed out after {args.timeout}s"}
            record.update(env)
            record["recipe"], record["emulated"] = recipe_of(system)
            records = [r for r in records if (r["model"], r["system"]) != (record["model"], system)] + [record]
            shown = (record["error"].splitlines() or [""])[-1] if "error" in record else \
                f"{record['tokens_per_s']:9.0f} tok/s  {record['peak_gib']:5.1f} GiB (training {record['train_peak_gib']:5.1f})" \
                f"  first step " \
                f"{record['first_step_s']:6.1f} s  loss {record['loss_first']:.3f} -> {record['loss_last']:.3f}"
            print(f"{name:14} {system:22} {shown}", flush=True)
            write_results(records, skipped, env, args.out)
    write_results(records, skipped, env, args.out)  # also when every (model, system) was skipped
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
