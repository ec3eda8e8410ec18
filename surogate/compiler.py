"""`surogate.compile`: prepare a HF model for LoRA training, capture it, rewrite it, hand it back.

Steps: resolve the recipe's plan for the arch (errors and warnings first, before any work);
attach LoRA through PEFT unless the model already has it; swap every target's base layer for a
frozen `SurogateLinear` holding the weight as the recipe says (q-recipes free the bf16 copy);
compile each decoder block with Dynamo and the surogate backend (regional compilation: one
graph serves every block of a class; the sequence dimension is marked dynamic); optionally
checkpoint each block, or the first `checkpoint_fraction` of them (its forward recomputed in the backward;
with "offload" its saved input waits in host memory, surogate/offload.py); route `labels=` calls through
the chunked LM head + cross-entropy (`surogate.ops.loss`).

Backend (docs/compile.md): the FX passes run on the torch-level graph, then on CPU the
rewritten graph runs through AOTAutograd without Inductor (`aot_eager`: seconds of compile,
what CI and the CPU main job need; Inductor's C++ backend for models aot_eager cannot run, or as
`SUROGATE_CPU_BACKEND` says: `cpu_backend`); on CUDA through Inductor (`compile_fx`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import math
import os
import re
import types
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.hooks import RemovableHandle

from surogate import moe, ops
from surogate.cache import source_tag
from surogate.compat import (check_dependencies, compile_options_cache_tag, import_bitsandbytes_offline,
                             tag_compile_cache)
from surogate.forward import attach_forward, backbone_of
from surogate.input_grad import make_inputs_require_grad, quiet_grad_reads
from surogate.kernels.plan import plan
from surogate.offload import BlockInputOffload
from surogate.ops import attention, linear_attention
from surogate.ops.modules import SurogateLinear, parameter_counts
from surogate.unload import attach_merge_guard, attach_unload
from surogate.weight_packing import pack_shared_input_weights
from surogate.passes import CompileReport, PassContext, run_pipeline
from surogate.passes.post_grad import post_grad_pass
from surogate.recipes import Recipe, get, normalize_arch
from surogate.recipes.arch import CPU, current_arch

check_dependencies()  # transformers 4.x and the like: one line saying what to install, not a failure deep inside
import_bitsandbytes_offline()  # before PEFT imports it: no Hub fetch at import (its docstring says why)

# The default LoRA targets, "those of these the model has" (surogate.compile and `surogate train`):
# separate and fused (Phi-3's qkv_proj, gate_up_proj) projections, and OPT's / BioGPT's / XGLM's names for the
# attention output and the MLP (out_proj, fc1, fc2), which have q/k/v_proj beside them: without these three only
# the attention inputs of those models would get LoRA.
from surogate.lora_targets import DEFAULT_TARGETS  # noqa: E402  (a module of its own: the config reads it too)
# Projections that architectures with some default names call the rest of their attention and MLP, added when a
# default name is found (alone they would be too wide: GPT-2's c_proj without c_attn, GPT-NeoX's dense alone):
# Phi-1/2's attention output `dense`, StarCoder2's and GPT-Neo's `c_fc`/`c_proj`, GPT-J's and CodeGen's
# `fc_in`/`fc_out`, Granite-MoE-shared's shared MLP, DeepSeek-V2/V3's low-rank (MLA) q and kv projections. Not
# routers (`router`, `gate`, `shared_expert_gate`: a LoRA on the expert choice) nor Gemma 3n/4's per-layer-input
# projections.
COMPANION_TARGETS = ("dense", "c_fc", "c_proj", "fc_in", "fc_out", "input_linear", "output_linear", "q_a_proj",
                     "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
DEFAULT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
# What `checkpoint=` takes: no checkpointing, recompute each block, or recompute with the inputs in host memory.
CHECKPOINT_MODES = (False, True, "offload")


class AlreadyCompiledError(RuntimeError):
    """`surogate.compile` was given a model it (or torch.compile) already compiled."""


def compile(model: nn.Module, recipe: "str | Recipe" = "bf16", lora: Any = None, arch: Any = None,
            allow_emulation: bool = False, *, regional: bool = True, dynamic: bool = True, producer: bool = True,
            horizontal: bool = True, chunked_loss: bool = True, checkpoint: "bool | str" = False,
            checkpoint_fraction: float = 1.0, recompute_producers: "bool | str" = "auto",
            grad_producer: bool = True, save_fp8_inputs: "bool | str" = False) -> nn.Module:
    """Turn a HF causal LM (or a PEFT model of one) into a LoRA training model for `recipe`.

    Returns the PEFT model, changed in place: drive it with `model(input_ids=..., labels=...)`,
    `.loss.backward()` and any optimizer; `model.save_pretrained(dir)` writes a PEFT adapter;
    `model.merge_and_unload()` gives back the plain HF model with LoRA merged (surogate/unload.py);
    `model.surogate_report` says what every target linear became (from the first forward on, when
    Dynamo compiles; until then it says that it is pending).

    All or nothing: every check (recipe, device, LoRA targets, dtype, frozen base) runs on the model as
    given before anything changes it, and a later failure undoes what was changed, so a refused model
    can be fixed (e.g. `model.to(torch.bfloat16)`) and compiled again.

    `checkpoint=True` turns on activation checkpointing of the decoder blocks: between forward and
    backward only each block's inputs (the residual stream, plus the small RoPE/mask tensors every
    block reads) stay alive; the backward runs each block's forward once more to rebuild the rest.
    It trades one extra forward of every block per step (with frozen base weights the backward is
    about one forward, so up to about half more block compute) for the activations of every layer.
    With regional compilation the compiled block call is wrapped in non-reentrant
    `torch.utils.checkpoint` (the recompute calls the same compiled graph: no recompile); with
    `regional=False` every block's forward is wrapped before the backbone is compiled, Dynamo
    captures each as a checkpoint region, the passes rewrite inside them and AOTAutograd's
    partitioner recomputes them. Blocks are checkpointed only while autograd records and no KV
    cache is passed (a replay would write the cache twice).

    `checkpoint="offload"`: checkpointing as above, and each block's saved input (the residual stream,
    layers x batch x seq x hidden in bf16) waits in pinned host memory between forward and backward
    instead of on the GPU: copied out on a side stream during the forward, copied back one block ahead
    of its recompute (surogate/offload.py). Works under `surogate.GraphedStep` (static host buffers).
    With `regional=False` the blocks still run as one shared compiled graph, called from the compiled
    backbone through a graph break: the copies and their streams live outside Dynamo.

    `checkpoint_fraction` (with `checkpoint=True` or "offload"; in (0, 1], default 1.0: every block): checkpoint
    only the first round(fraction x blocks) decoder blocks in forward order (halves round up, at least one); the
    rest keep their activations as without checkpointing, and with "offload" only the checkpointed blocks'
    inputs go to host memory. Each block left out keeps its activations (Qwen3-8B at 2 x 2048: about 0.3 GiB a
    micro-batch) and skips its recompute (1/36 of the step time checkpointing adds there), so peak memory and
    step time both move linearly between those of checkpoint=False (fraction 0) and checkpoint=True (1): for a
    budget B, fraction = (peak_off - B) / (peak_off - peak_on) from those two runs. A fraction, not a block
    count, because that interpolation does not depend on the depth: one value carries across model sizes.
    Why the first blocks: the backward reaches the last blocks first, so their kept activations are freed
    before any recompute starts: the peak holds either the kept activations or one block's recompute, never
    both (with the un-checkpointed blocks first, every recompute runs while all of them are still held: one
    block's activations more at the peak). And with "offload" the inputs that wait longest go to the host.

    `recompute_producers` ("auto", the default; True; False): with True the RMSNorm and SwiGLU outputs that the
    LoRA linears read, o_proj's layout copy and the attention's q/k/v are rebuilt in the backward from tensors it
    keeps anyway, instead of kept from the forward (passes/recompute.py): on an H200, Qwen3-8B keeps 7 GiB less
    (bf16 35.3 -> 28.2 GiB, qfp8 29.4 -> 22.4) for 2.2% of bf16's speed (bench/NOTES.md runs 51, 91). "auto"
    keeps them for the recipes that keep bf16 weights (bf16, fp8, fp4) when they take at most a fifth of the
    GPU memory free at compile time, and rebuilds them otherwise: for the recipes that store their weights
    quantized, with activation checkpointing, on the CPU. The report says what it chose and why.

    `grad_producer=True` (the default; it matters for the recipes with an FP8 dgrad: fp8, qfp8): the compiled
    backward quantizes each dgrad's gradient with the traceable twin of the op's quantizer, so that Inductor
    fuses it into the kernel that produces the gradient (SwiGLU backward, RMSNorm backward) instead of a
    separate quantize kernel reading it back; the forward's `producer` for the backward. On the CPU the same
    bits either way. On the H200 (bench/NOTES.md run 58, same call) Qwen3-8B fp8 ran at 18,862 tokens/s with
    it against 18,378 without (+2.6%), qfp8 at 16,934 against 16,707 (+1.4%).

    `save_fp8_inputs` (False, the default; True; "auto"; it matters for the recipes with an FP8 forward: fp8,
    qfp8): with True each LoRA linear whose forward GEMM reads an FP8 copy of its input made by the input's
    producer keeps that copy for the backward (LoRA A's gradient) instead of the bf16 input: about half the bytes,
    and nothing to rebuild (passes/save_fp8.py). A's gradient then reads the values the forward GEMM read. "auto"
    turns it on where `recompute_producers` keeps those inputs (fp8 on a GPU with memory to spare) and off where it
    rebuilds them (qfp8, checkpointing), which keeps nothing of them. Off by default: on an H200 Qwen3-8B fp8 keeps
    2.3 GiB less for 2.1-2.4% of its speed (bench/NOTES.md runs 139-142; A's gradient read from the copy,
    `kernels/grad_lora_fp8.py`, is slower than cuBLAS on the bf16 input).
    """
    if not (isinstance(checkpoint, bool) or (isinstance(checkpoint, str) and checkpoint in CHECKPOINT_MODES)):
        raise ValueError(f"checkpoint takes False, True (recompute each decoder block in the backward) or "
                         f"'offload' (also keep the blocks' saved inputs in host memory), got {checkpoint!r}")
    _check_checkpoint_fraction(checkpoint, checkpoint_fraction)
    if recompute_producers not in (True, False, "auto"):
        raise ValueError(f"recompute_producers takes 'auto' (keep the norm / SwiGLU outputs where memory is plenty), "
                         f"True (rebuild them in the backward) or False (keep them), got {recompute_producers!r}")
    if save_fp8_inputs not in (True, False, "auto"):
        raise ValueError(f"save_fp8_inputs takes False (keep the LoRA linears' bf16 inputs for the backward), True "
                         f"(keep their FP8 copies) or 'auto' (FP8 where the bf16 inputs would be kept), "
                         f"got {save_fp8_inputs!r}")
    if checkpoint and recompute_producers == "auto":
        recompute_producers = True  # checkpointing asks for memory first
    rec = get(recipe)  # unknown names raise with the list of valid ones
    tag_compile_cache(source_tag())  # a persistent Inductor cache never serves code of another surogate
    arch_name = current_arch() if arch is None else normalize_arch(arch)
    the_plan = plan(rec, arch_name).check(allow_emulation)
    inductor = arch_name != CPU or cpu_backend(model) == "inductor"  # a misspelt SUROGATE_CPU_BACKEND stops here
    # Every check runs on the model as given, before anything changes it: a refused model is left as it was.
    _refuse_compiled(model)
    _refuse_hf_checkpointing(model, checkpoint)
    if checkpoint:
        _check_checkpointable(model)
    config = _lora_config(model, lora)
    device = _target_device(model, arch_name)
    planned = _planned_targets(model, config)
    _check_dtype(planned, rec)
    undo = _Undo(model)
    try:
        return _compile_checked(model, config, rec, arch_name, the_plan, undo, device, regional=regional, dynamic=dynamic,
                                producer=producer, horizontal=horizontal, chunked_loss=chunked_loss,
                                checkpoint=checkpoint, checkpoint_fraction=checkpoint_fraction,
                                recompute_producers=recompute_producers, grad_producer=grad_producer,
                                save_fp8_inputs=save_fp8_inputs, inductor=inductor)
    except BaseException:
        undo.restore()  # a step past the checks failed: put the model back as it came
        raise


def _compile_checked(model: nn.Module, config: Any, rec: Recipe, arch_name: str, the_plan, undo: "_Undo",
                     device: "torch.device | None", *,
                     regional: bool, dynamic: bool, producer: bool, horizontal: bool, chunked_loss: bool,
                     checkpoint: "bool | str", checkpoint_fraction: float = 1.0,
                     recompute_producers: "bool | str" = "auto", grad_producer: bool = True,
                     save_fp8_inputs: "bool | str" = False, inductor: bool = True) -> nn.Module:
    """The changes `compile` makes, once every check passed; each is recorded in `undo`."""
    undo.own_configs()  # before anything writes on them
    wanted = None if config is None or config.target_modules is None else copy.copy(config.target_modules)
    peft_model = model if config is None else undo.attach(model, config)  # PEFT may rewrite config's targets
    targets = _lora_layers(peft_model)
    if config is not None:  # a PeftModel given was checked before
        _check_frozen(peft_model, targets)
    report = CompileReport(recipe=rec.name, arch=arch_name,
                           backend="inductor" if inductor else "aot_eager (no Inductor)")
    if config is not None:
        _warn_unmatched_targets(peft_model, wanted, peft_model.peft_config["default"], report)
    swapped = _swap_base_layers(targets, rec, undo, device)
    report.note(f"{swapped} base layers hold their weight as {rec.weight_format.value}"
                + ("" if rec.keeps_bf16_weight else " (bf16 copy freed)"))
    if horizontal:
        packed = pack_shared_input_weights(targets, rec, undo, device)
        if packed:
            report.note(f"{len(packed)} groups of linears that share their input (e.g. "
                        f"{', '.join(n.rsplit('.', 1)[-1] for n in packed[0])}) hold their frozen weights packed in one "
                        f"buffer, which the fused GEMM reads whole")
    for line in moe.swap_experts(peft_model, rec, undo, device):
        report.note(line)
    if device is not None:
        # The targets went to the GPU one at a time, quantized on the way; now the rest (embeddings, norms,
        # LoRA factors). The model's bf16 weights never were on the GPU all at once.
        undo.moved = True
        peft_model.to(device)
        report.note(f"model moved to {device} layer by layer, each target quantized on the way")
    if the_plan.support.value == "emulated":
        report.note(the_plan.explain())
    hf = peft_model.base_model.model
    blocks = _decoder_blocks(hf, targets)
    # How often one compiled graph runs per forward: each decoder block calls the shared one (what pass 5's "auto"
    # multiplies a graph's kept bytes by); the whole-backbone graph holds every block itself.
    graph_calls = len(blocks) if blocks and regional else 1
    ctx_options = {"horizontal": horizontal, "producer": producer, "recompute_producers": recompute_producers,
                   "grad_producer": grad_producer, "save_fp8_inputs": save_fp8_inputs, "graph_calls": graph_calls}
    if ops.grad_output_quantizer(rec.grad_input, rec.weight_format) is not None:
        report.note("backward: the FP8 dgrad's gradient quantized in the kernel that produces it (grad_producer)"
                    if grad_producer else "backward: the FP8 dgrad quantizes its gradient itself (grad_producer off)")
    if inductor and arch_name == CPU:
        report.note("CPU graphs compiled by Inductor (C++), not aot_eager: "
                    + ("SUROGATE_CPU_BACKEND=inductor" if os.environ.get("SUROGATE_CPU_BACKEND") else
                       "this model's linear-attention layers are not ones surogate recognizes, and their "
                       "traced backward fails aot_eager (docs/compile.md)"))
    backend = make_backend(rec, arch_name, report, ctx_options, inductor=inductor)
    if getattr(getattr(hf, "config", None), "use_cache", False):
        # A KV cache in training makes each block update its own cache slot (a guard on layer_idx):
        # one recompile per layer. Training needs no cache; generate() can still pass use_cache=True.
        hf.config.use_cache = False
        report.note("config.use_cache set to False (training needs no KV cache; it would recompile per layer)")
    original_attention = attention.install(hf)
    refusal = attention.packing_refusal(hf)
    refused = f"packed rows with position_ids are refused: the model {refusal}; pad instead"
    if original_attention is None:
        report.note("attention: transformers' own masks (this architecture does not call through "
                    "ALL_ATTENTION_FUNCTIONS, or its layers do not pass their kwargs on to it): "
                    + (refused if refusal else "packed rows keep their examples apart in transformers' masks, built "
                       "from position_ids (a dense mask each step: padded rows cost less)"))
    else:
        report.note(f"attention: surogate (masks from position_ids / attention_mask inside the layers, no host "
                    f"sync; plain causal rows run {original_attention}'s causal kernel)")
        if refusal:
            report.note(refused)
    deltanet = linear_attention.install(hf, undo.attributes.set)
    if deltanet:
        report.note(f"linear attention: {deltanet} gated DeltaNet layers run the delta rule as one op "
                    "(surogate::gated_delta_rule, backward by recompute), packed examples kept apart")
    checkpointed = checkpointed_blocks(len(blocks), checkpoint_fraction) if checkpoint else 0
    offload = BlockInputOffload() if checkpoint == "offload" else None
    if blocks and (regional or offload is not None):
        hook = make_inputs_require_grad(hf)  # else block 0 sees an input without grad: a second graph
        if hook is not None:
            undo.hooks.append(hook)
        _compile_blocks(blocks, backend, dynamic, checkpoint, offload, checkpointed)
        classes = list(dict.fromkeys(type(b).__name__ for b in blocks))
        report.note(f"regional compilation: {len(blocks)} decoder blocks of {' and '.join(classes)} share one "
                    f"compiled graph{' per class' if len(classes) > 1 else ''}")
    if not (blocks and regional):
        if offload is not None:
            # The offload's copies, streams and host buffers stay outside Dynamo: each block call is a graph
            # break in the backbone, and the block runs its own shared compiled graph (compiled above).
            for block in blocks:
                block.forward = torch._dynamo.disable(block.forward)
        elif checkpoint:
            _checkpoint_blocks(blocks[:checkpointed])  # before the backbone is compiled: Dynamo captures regions
        # The backbone, not the CausalLM: both the chunked-loss path and HF's forward go through it.
        body = backbone_of(hf)
        # dynamic=None, never True: True turns Python floats (the LoRA scale) into graph inputs, which the
        # match pass refuses; automatic dynamic shapes still stop recompiling after the second length.
        body.forward = torch.compile(body.forward, backend=backend, dynamic=None)
        if checkpoint and checkpointed:
            body.forward = _side_effects_not_replayed(body.forward)
        report.note("whole-backbone capture (no repeated decoder blocks found, or regional=False)")
    if checkpoint and checkpointed == len(blocks):
        report.note(f"activation checkpointing on: each of the {len(blocks)} decoder blocks keeps only its inputs "
                    "and recomputes its forward in the backward")
    elif checkpoint:
        report.note(f"activation checkpointing on for the first {checkpointed} of the {len(blocks)} decoder blocks "
                    f"(checkpoint_fraction={checkpoint_fraction:g}): each keeps only its inputs and recomputes its "
                    f"forward in the backward; the last {len(blocks) - checkpointed} keep their activations")
    if offload is not None:
        how = ("copied inline (CPU: no streams)" if arch_name == CPU else
               "pinned, copied out on a side stream and back one block ahead of its recompute")
        report.note(f"checkpoint='offload': each checkpointed block's saved input waits in host memory between "
                    f"forward and backward, {how}"
                    + ("" if regional else "; with regional=False each block call is a graph break in the backbone"))
    attach_forward(hf, report, chunked_loss)
    report.note(f"parameters: {parameter_counts(peft_model, rec.name)}")
    report.pending = (f"linears: pending until the first forward (Dynamo compiles lazily); {len(targets)} LoRA "
                      "target layers")
    peft_model.surogate_report = report
    peft_model.surogate_plan = the_plan
    if offload is not None:
        peft_model.surogate_offload = offload  # its host buffers and copies (surogate/offload.py)
    _refuse_hf_checkpointing_later(hf, undo.attributes, checkpoint)
    _refuse_deepcopy(peft_model, hf, undo.attributes)
    peft_model._surogate_compiled = True
    undo.attributes.set(hf, "_surogate_compiled", True)  # the model given, compiled again: AlreadyCompiledError
    attach_unload(peft_model, undo.unwrap())  # PEFT's merge on plain base layers, then the HF model as it was
    attach_merge_guard(peft_model, rec.name)
    _check_added_adapters(peft_model)
    _allow_more_call_kinds(report)
    return peft_model


# Graphs Dynamo may keep per compiled function before it runs further kinds of call eagerly (its default: 8)
RECOMPILE_LIMIT = 64


def _allow_more_call_kinds(report: CompileReport) -> None:
    """Raise Dynamo's `recompile_limit` (process-wide) to RECOMPILE_LIMIT. All decoder blocks of one class share
    one compiled function, and each kind of call gets its own graph of it: with or without gradients, labels,
    the adapter active, another one ("ref", TRL's DPO / KTO / GRPO reference), disabled. A DPO run with eval
    used 7; the 9th kind ran every linear unfused, with only torch's one warning (the report still said
    rewritten). Shapes add few (`dynamic`): a plain loop over nine batch shapes, sizes 1 among them, made 4."""
    config = torch._dynamo.config
    if config.recompile_limit < RECOMPILE_LIMIT:
        report.note(f"Dynamo's recompile_limit raised from {config.recompile_limit} to {RECOMPILE_LIMIT} "
                    "(process-wide): each kind of call (grad or not, labels or not, adapter set or disabled) "
                    "compiles the blocks once, and past the limit one would run unfused")
        config.recompile_limit = RECOMPILE_LIMIT


# --- checks -------------------------------------------------------------------------------------------

def _refuse_compiled(model: nn.Module) -> None:
    if getattr(model, "_surogate_compiled", False):
        raise AlreadyCompiledError("this model was already passed through surogate.compile; train the model it "
                                   "returned, or reload the model to change the recipe")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise AlreadyCompiledError("this model is already wrapped by torch.compile; pass the uncompiled model "
                                   "(model._orig_mod) to surogate.compile")


def _target_device(model: nn.Module, arch: str) -> "torch.device | None":
    """None when the model is where it runs; the CUDA device when a CPU model is to be moved there by
    `compile` (targets quantized one at a time on the way, so a model whose bf16 weights do not fit the
    GPU still trains there in a q-recipe)."""
    devices = {p.device.type for p in model.parameters()}
    if arch == CPU and devices != {"cpu"}:
        raise ValueError(f"arch='cpu' runs the reference backend but the model is on {sorted(devices)}; "
                         "move it with model.cpu() or pass arch=None")
    if arch != CPU and "cuda" not in devices:
        if devices == {"cpu"} and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if devices == {"cpu"}:  # compile would move it, but there is no GPU to move it to
            raise ValueError(f"arch {arch} runs on a CUDA GPU, but torch sees none here (torch "
                             f"{torch.__version__}); pass arch='cpu' to run the reference on the CPU")
        raise ValueError(f"arch {arch} needs the model on a CUDA device (or on the CPU, to be moved by compile); "
                         f"it is on {sorted(devices)}; pass arch='cpu' to run the reference on the CPU")
    return None


def _check_checkpoint_fraction(checkpoint: "bool | str", fraction: Any) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"checkpoint_fraction takes a number in (0, 1] (the share of decoder blocks checkpointed, "
                         f"the first ones), got {fraction!r}")
    if fraction < 1 and not checkpoint:
        raise ValueError(f"checkpoint_fraction={fraction!r} needs checkpoint=True or 'offload' (it says how many "
                         "of the decoder blocks to checkpoint); pass one, or leave checkpoint_fraction at 1.0")


def checkpointed_blocks(n_blocks: int, fraction: float) -> int:
    """How many decoder blocks `checkpoint_fraction` checkpoints (the first ones): the nearest whole number of
    `fraction x n_blocks`, halves rounded up, at least one (a fraction above 0 asks for some)."""
    return min(n_blocks, max(1, math.floor(fraction * n_blocks + 0.5)))


def _refuse_hf_checkpointing(model: nn.Module, checkpoint: "bool | str") -> None:
    """Transformers' checkpointing wraps each block call in `torch.utils.checkpoint`, through which Dynamo captures
    nothing: every LoRA linear would silently run eagerly. Surogate's own `checkpoint=True` saves the same memory."""
    if not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return
    # transformers 5.2x renamed it (the old name still works, with a FutureWarning)
    off = "activation" if hasattr(model, "activation_checkpointing_disable") else "gradient"
    if checkpoint:
        raise ValueError("the model has Hugging Face gradient checkpointing on; with checkpoint=True surogate "
                         f"checkpoints the blocks itself: call model.{off}_checkpointing_disable() first")
    raise ValueError("the model has Hugging Face gradient checkpointing on, which torch.compile cannot capture (no "
                     f"linear would be rewritten): call model.{off}_checkpointing_disable() first and pass "
                     "checkpoint=True (surogate checkpoints the decoder blocks itself, the same memory saving)")


def _refuse_hf_checkpointing_later(hf: nn.Module, attributes: "_Attributes", checkpoint: "bool | str") -> None:
    """Turning transformers' checkpointing on after `compile` is refused too: `Trainer` does it at `train()` for
    `gradient_checkpointing=True` (TRL's configs, `SFTConfig`, `DPOConfig`, `GRPOConfig`, ..., set it by default),
    and then the compiled blocks ran eagerly without a word (0 graphs, every LoRA linear unfused), as
    `_refuse_hf_checkpointing` says."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        done = "surogate already checkpoints the blocks" if checkpoint else \
            "for its memory saving pass checkpoint=True to surogate.compile"
        raise ValueError("Hugging Face gradient checkpointing cannot run inside a model compiled by surogate (no "
                         "linear would stay fused): set gradient_checkpointing=False in TrainingArguments or "
                         f"the TRL config (TRL's SFTConfig, DPOConfig, GRPOConfig, KTOConfig, RewardConfig turn it on "
                         f"by default); {done}")

    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        if hasattr(hf, name):
            attributes.set(hf, name, refuse)


def _refuse_deepcopy(peft_model: nn.Module, hf: nn.Module, attributes: "_Attributes") -> None:
    """`copy.deepcopy` of a compiled model (a reference or EMA copy made after `compile`) gave a model whose
    forwards ran the original's modules (the wrappers hold them): the copy's own weights were never read, and
    training the original moved the copy too. Refused in one line; `merge_and_unload()` gives it back."""
    def refuse(memo: dict) -> None:
        raise TypeError("a model compiled by surogate cannot be deep-copied (its forwards would run the original's "
                        "modules): deep-copy the model before surogate.compile, and compile the copy if it trains")

    for model in (peft_model, hf):
        attributes.set(model, "__deepcopy__", refuse)


def _check_checkpointable(model: nn.Module) -> None:
    blocks = _decoder_blocks(model, None)
    if not blocks:
        raise ValueError("checkpoint=True checkpoints the decoder blocks, but the model has no ModuleList of "
                         "blocks holding linears; pass checkpoint=False")


def _check_dtype(targets: list[tuple[str, nn.Module]], recipe: Recipe) -> None:
    for name, module in targets:
        weight = getattr(module, "weight", None)
        if weight is not None and _quantized_by_a_loader(weight):
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            kind = f"{type(base).__module__.split('.')[0]} {type(base).__name__}"
            raise TypeError(f"{name} is a {kind} (weights stored as {weight.dtype}: the model was loaded with a "
                            "quantization_config); surogate quantizes bf16 weights itself: call "
                            "model.dequantize(dtype=torch.bfloat16) on the transformers model before get_peft_model "
                            "(or load it in bfloat16 without quantization_config), then compile with "
                            f"recipe={recipe.name!r}"
                            + (" (bitsandbytes' NF4 with double quantization)" if recipe.name == "qnf4" else ""))
        if weight is not None and weight.dtype != torch.bfloat16:
            raise TypeError(f"recipe {recipe.name!r} takes bfloat16 base weights, but {name} holds {weight.dtype}; "
                            "load the model with dtype=torch.bfloat16 (or call model.to(torch.bfloat16))")


def _quantized_by_a_loader(weight: torch.Tensor) -> bool:
    """Whether a target's base weight was quantized when the model loaded (bitsandbytes' Linear4bit / Linear8bitLt,
    transformers' FP8Linear, GPTQ, AWQ...): integer or FP8 storage. For such a model "load it in bfloat16" is no
    advice: it was, and the loader quantized it after."""
    return not weight.dtype.is_floating_point or weight.dtype.itemsize == 1 or hasattr(weight, "quant_state")


def _check_frozen(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    for name, module in targets:
        base = module.get_base_layer()
        if any(p.requires_grad for p in base.parameters()):
            raise ValueError(f"the base weight of {name} is trainable; surogate trains LoRA adapters on a frozen "
                             f"base: freeze it (requires_grad_(False)) or drop it from modules_to_save")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if trainable:
        warnings.warn(f"{len(trainable)} non-LoRA parameters are trainable (e.g. {trainable[0]}); they train in "
                      "bf16 outside the fused kernels", stacklevel=3)


_MISSING = object()


class _Attributes:
    """Instance attributes `compile` sets on a model's modules (forwards, attention markers, config copies, the
    compiled mark), each with its value before; `restore` puts those back. A failed compile restores them with
    the rest of `_Undo`; `merge_and_unload()` / `unload()` of the compiled model restore what is left of them."""

    def __init__(self) -> None:
        self.saved: list[tuple[nn.Module, str, Any]] = []

    def record(self, modules: Any, attr: str) -> None:
        """Save the current `attr` of each of `modules` (which a later step may set)."""
        self.saved += [(m, attr, vars(m).get(attr, _MISSING)) for m in modules]

    def set(self, module: nn.Module, attr: str, value: Any) -> None:
        self.record([module], attr)
        setattr(module, attr, value)

    def changed(self) -> "_Attributes":
        """Only the entries that differ now: what unload must put back, without keeping the rest alive (the
        original base layers of a q-recipe among them)."""
        kept = _Attributes()
        kept.saved = [(m, a, v) for m, a, v in self.saved if vars(m).get(a, _MISSING) is not v]
        return kept

    def restore(self) -> None:
        for module, attr, value in reversed(self.saved):
            if value is _MISSING:
                vars(module).pop(attr, None)
            else:
                setattr(module, attr, value)


class _Undo:
    """What `compile` changes on a model that passed its checks, recorded so that a failure half-way
    (a bug, a format that refuses a shape) hands the model back as it came: LoRA detached, base layers,
    requires_grad flags, forwards, the config copies (attention implementation, use_cache), the input-grad hook."""

    def __init__(self, model: nn.Module) -> None:
        from peft import PeftModel

        self.model = model
        self.hf = model.base_model.model if isinstance(model, PeftModel) else model
        self.peft_model = None
        self.had_peft_config = hasattr(model, "peft_config")
        self.swapped: list[tuple[nn.Module, nn.Module]] = []
        self.replaced: list[tuple[nn.Module, str, nn.Module]] = []  # (owner, attribute, original module)
        self.classes: list[tuple[nn.Module, type]] = []  # (module, its original class)
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.attributes = _Attributes()
        self.attributes.record(model.modules(), "forward")
        self.attributes.record(model.modules(), attention._ORIGINAL_ATTR)
        self.attributes.record(model.modules(), attention._CROSS_ATTR)
        self.hooks: list[RemovableHandle] = []  # compile's own (the input-grad hook)
        self.moved = False  # compile moved a CPU model to the GPU

    def own_configs(self) -> None:
        """Give the model copies of its config and sub-configs (text_config, ...) before `compile` writes on
        them: models built by `from_config(cfg)` share `cfg`, and a sibling would see this one's attention
        implementation and use_cache (compiling it: surogate attention calling itself; left uncompiled: its
        padding mask ignored)."""
        from transformers import PretrainedConfig

        memo: dict = {}  # one memo: a sub-config that several modules hold maps to one copy
        for module in self.hf.modules():
            config = vars(module).get("config")
            if isinstance(config, PretrainedConfig):
                self.attributes.set(module, "config", copy.deepcopy(config, memo))

    def attach(self, model: nn.Module, config: Any) -> nn.Module:
        self.peft_model = _get_peft_model(model, config)
        return self.peft_model

    def unwrap(self) -> "_Unwrap":
        """What `merge_and_unload()` / `unload()` of the compiled model put back."""
        return _Unwrap(self.attributes.changed(), self.hooks)

    def restore(self) -> None:
        for module, base in reversed(self.swapped):
            module.base_layer = base
        for owner, attr, original in reversed(self.replaced):
            setattr(owner, attr, original)
        for module, cls in reversed(self.classes):
            module.__class__ = cls
        self.unwrap().restore()
        if self.peft_model is not None:
            self.peft_model.base_model.unload()  # the original base layers back in place of PEFT's
            if not self.had_peft_config:
                vars(self.model).pop("peft_config", None)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        if self.moved:
            self.model.to("cpu")


@dataclasses.dataclass
class _Unwrap:
    """The HF model's own forwards, attention markers and config objects as before `compile`, without compile's
    hooks."""

    attributes: _Attributes
    hooks: list[RemovableHandle]

    def restore(self) -> None:
        self.attributes.restore()
        for hook in self.hooks:
            hook.remove()


# --- preparation --------------------------------------------------------------------------------------

def _attach_lora(model: nn.Module, lora: Any) -> nn.Module:
    """The PEFT model: `model` itself if it is one, else `model` with LoRA attached by PEFT."""
    config = _lora_config(model, lora)
    return model if config is None else _get_peft_model(model, config)


def _get_peft_model(model: nn.Module, config: Any) -> nn.Module:
    from peft import get_peft_model

    from surogate.compat import quiet_peft_deprecations

    # PEFT's transformers-4 target conversion runs as PEFT runs it (on MoE model types such as GLM-4-MoE or DeepSeek
    # it sends gate_proj/up_proj/down_proj to the fused expert stacks, so a dense MLP of those names gets no LoRA):
    # PeftModel.from_pretrained runs it again on the saved config, and an adapter trained on other targets would
    # not load back (tests/test_more_archs.py, the save/load round trip).
    with quiet_peft_deprecations():
        return get_peft_model(model, config)


def _lora_config(model: nn.Module, lora: Any):
    """The LoraConfig to attach to `model`, or None when `model` is a PeftModel already (then `lora` must be None)."""
    from peft import LoraConfig, PeftModel

    if isinstance(model, PeftModel):
        if lora is not None:
            raise ValueError("the model already has PEFT adapters; pass lora=None")
        for config in model.peft_config.values():
            _check_lora_fields(config)
        return None
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"surogate.compile takes a Hugging Face PreTrainedModel or a PeftModel, "
                        f"got {type(model).__name__}")
    if isinstance(lora, LoraConfig):
        _check_lora_fields(lora)
        if lora.target_modules is None and not getattr(lora, "target_parameters", None):
            # PEFT would guess the targets from the model type (and fail on one it does not list): ours instead
            targets = default_targets(model)
            exclude = lora.exclude_modules or default_exclude(model, targets)
            return dataclasses.replace(lora, target_modules=targets, exclude_modules=exclude)
        return copy.deepcopy(lora)  # PEFT rewrites the config it attaches (an MoE model's targets): not the user's
    if lora is not None and not isinstance(lora, Mapping):
        raise TypeError(f"lora takes a dict of LoraConfig options (e.g. {{'r': 8}}) or a peft.LoraConfig, "
                        f"got {type(lora).__name__} {lora!r}")
    options = {**DEFAULT_LORA, **(lora or {})}
    if "target_modules" not in options:
        options["target_modules"] = default_targets(model)
        if options.get("exclude_modules") is None:
            options["exclude_modules"] = default_exclude(model, options["target_modules"])
    if "target_parameters" not in options and moe.expert_modules(model):
        options["target_parameters"] = moe.expert_target_parameters(model)  # one LoRA pair per expert
    if not options["target_modules"] and not options.get("target_parameters"):
        raise ValueError("the model has no linear layer inside its decoder blocks to target; pass "
                         "lora={'target_modules': [...]} naming its linear layers")
    options.setdefault("fan_in_fan_out", _uses_conv1d(model, options["target_modules"]))
    options.setdefault("task_type", _peft_task(model))
    config = LoraConfig(**options)
    _check_lora_fields(config)
    return config


# PEFT's task for a model's head (transformers' `loss_type`): the PeftModel class that runs it, and for a
# classification head that head trained in full (`modules_to_save`). As CAUSAL_LM a classification model failed in
# PEFT (no `prepare_inputs_for_generation`).
_PEFT_TASKS = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
               "ForQuestionAnswering": "QUESTION_ANS"}


def _peft_task(model: nn.Module) -> str | None:
    """PEFT's task for `model`: its head's (`_PEFT_TASKS`); SEQ_2_SEQ_LM for an encoder-decoder reading `input_ids`
    (T5, BART), CAUSAL_LM for a model that generates from them; otherwise none (PEFT's plain PeftModel, which passes
    the call on as given). As CAUSAL_LM a masked LM or a headless backbone (`Qwen3Model` for embeddings) failed in
    PEFT (no `prepare_inputs_for_generation`), and Whisper on its `input_ids=None` (given twice)."""
    task = _PEFT_TASKS.get(getattr(model, "loss_type", None))
    if task is not None:
        return task
    if getattr(model, "main_input_name", None) != "input_ids" or not hasattr(model, "prepare_inputs_for_generation"):
        return None
    return "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM"

# LoraConfig fields whose LoRA variants the fused kernels do not run, with the value they must keep.
_PLAIN_LORA_FIELDS = {"use_dora": False, "lora_bias": False, "bias": "none", "use_qalora": False,
                      "alora_invocation_tokens": None, "velora_config": None, "monteclora_config": None,
                      "kasa_config": None, "arrow_config": None, "use_bdlora": None, "layer_replication": None,
                      "megatron_config": None}


def lora_variant(config: Any) -> "tuple[str, Any] | None":
    """The first field of a LoraConfig that makes a LoRA variant surogate does not run (DoRA, LoRA biases, ...),
    with its value; None for plain LoRA."""
    for field, plain in _PLAIN_LORA_FIELDS.items():
        value = getattr(config, field, plain)
        if value != plain and not (plain is None and not value):
            return field, value
    return None


def _check_lora_fields(config: Any) -> None:
    """Refuse LoRA variants surogate does not run, naming the field: PEFT would accept them and every linear
    would stay unfused."""
    found = lora_variant(config)
    if found is not None:
        field, value = found
        raise ValueError(f"lora {field}={value!r} is not supported: surogate runs plain LoRA; drop {field} "
                         "(or train this variant with PEFT alone)")


def _check_added_adapters(peft_model: nn.Module) -> None:
    """Run `_check_lora_fields` on adapters added after compile (`add_adapter`): PEFT would attach DoRA etc. to the
    SurogateLinear base layers, which ran unfused (bf16) or failed inside PEFT (q-recipes: no bf16 weight)."""
    peft_method = peft_model.add_adapter

    def add_adapter(adapter_name: str, peft_config: Any, *args: Any, **kwargs: Any) -> None:
        _check_lora_fields(peft_config)
        return peft_method(adapter_name, peft_config, *args, **kwargs)

    add_adapter.__doc__ = peft_method.__doc__
    peft_model.add_adapter = add_adapter


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of the linear layers (nn.Linear, GPT-2's Conv1D) of `model`: what LoRA can target."""
    return [name for name, module in model.named_modules() if name and _is_linear(module)]


def target_matches(target: str, name: str) -> bool:
    """PEFT's rule for a `target_modules` list entry: the module's full name, or its dotted suffix."""
    return name == target or name.endswith(f".{target}")


def unmatched_targets(targets: "list[str] | tuple[str, ...]", names: list[str]) -> list[str]:
    """The entries of a `target_modules` list that match none of the module `names`."""
    return [t for t in targets if not any(target_matches(t, n) for n in names)]


def short_linear_names(model: nn.Module) -> list[str]:
    """The distinct last components of the linear layers' names (q_proj, ..., lm_head), for messages."""
    return sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})


def _planned_targets(model: nn.Module, config: Any) -> list[tuple[str, nn.Module]]:
    """The layers LoRA goes on, found without changing `model`: PEFT's target matching, run ahead of PEFT so
    that a config matching nothing (or a non-linear layer) is refused before the model is touched."""
    if config is None:  # a PeftModel: its LoRA layers are the targets
        targets = [(n, m.get_base_layer()) for n, m in _lora_layers(model)]
        if not targets:
            raise ValueError("the model has no LoRA linear to train: pass lora=LoraConfig(target_modules=[...]) "
                             "naming its linear layers")
        _check_frozen(model, _lora_layers(model))
        if not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n):
            warnings.warn("the PeftModel's LoRA weights are all frozen, so nothing will train: PeftModel."
                          "from_pretrained loads an adapter for inference unless is_trainable=True; load it with "
                          "is_trainable=True (surogate.load_adapter(base, path, is_trainable=True)) to train on "
                          "from it", stacklevel=3)
        return targets
    from peft.tuners.tuners_utils import check_target_module_exists

    wanted = config.target_modules
    if isinstance(wanted, str) and wanted.lower() == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        planned = [(n, m) for n, m in model.named_modules() if n and _is_linear(m) and m is not head]
    else:
        planned = [(n, m) for n, m in model.named_modules() if n and check_target_module_exists(config, n)]
    available = ", ".join(short_linear_names(model)) or "none"
    moe.check_target_parameters(model, getattr(config, "target_parameters", None))
    if not planned and getattr(config, "target_parameters", None):
        return planned  # LoRA on expert parameters only
    if not planned:
        raise ValueError(f"LoRA target_modules {_show(wanted)} match no layer of {type(model).__name__}; "
                         f"its linear layers: {available} (or target_modules='all-linear')")
    odd = [(n, m) for n, m in planned if not (_is_linear(m) or isinstance(m, nn.Embedding))]
    if odd:
        raise ValueError(f"LoRA target {odd[0][0]} is a {type(odd[0][1]).__name__}, not a linear layer; name linear "
                         f"layers in target_modules: {available}")
    return planned


def _warn_unmatched_targets(model: nn.Module, wanted: Any, attached: Any, report: "CompileReport") -> None:
    """Warn about the names of the `target_modules` asked for (`wanted`, as they were before PEFT) that match no
    layer of the PEFT model `model` and that PEFT did not send to the experts either: its transformers-4 conversion
    takes an MoE model's gate_proj / up_proj / down_proj off `target_modules` (of `attached`, the config PEFT holds,
    changed in place) and LoRA reaches the expert stacks through `target_parameters`, which the report says
    instead. The default list passed as a list (`surogate train`) means "those the model has": no warning."""
    if wanted is None or isinstance(wanted, str) or set(wanted) == set(DEFAULT_TARGETS):
        return
    # Against every module name, not the planned ones: a target that exclude_modules removes does exist.
    missing = unmatched_targets(sorted(wanted), [n for n, _ in model.named_modules() if n and "lora_" not in n])
    kept = set(attached.target_modules or ())
    converted = [t for t in missing if t not in kept]
    if converted and getattr(attached, "target_parameters", None):
        report.note(f"LoRA target_modules {converted} are the experts' here: PEFT trains them through "
                    f"target_parameters {sorted(attached.target_parameters)}")
    missing = [t for t in missing if t in kept]
    if missing:
        names = {n.removesuffix(".base_layer").rsplit(".", 1)[-1] for n in linear_module_names(model)
                 if ".lora_" not in n}
        available = ", ".join(sorted(names)) or "none"
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        warnings.warn(f"LoRA target_modules {missing} match no layer of {type(base).__name__}; LoRA goes on "
                      f"the others (its linear layers: {available})", stacklevel=4)


def _show(targets: Any) -> str:
    return repr(targets) if isinstance(targets, str) else str(sorted(targets))


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


# PEFT refuses LoRA on these names in Mamba-based models (peft.tuners.tuners_utils, the model types below: their
# fused kernels read the mixer's out_proj weight directly), so they are never a default there.
_MAMBA_MODEL_TYPES = ("falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h")
_MAMBA_REFUSED = ("out_proj", "conv1d")


def default_targets(model: nn.Module) -> list[str]:
    """q,k,v,o,gate,up,down (fused qkv / gate_up; OPT's out_proj, fc1, fc2) where they exist, with the companions
    their architecture names its other projections by (COMPANION_TARGETS), else every linear in the blocks; in
    Mamba-based models not the names PEFT refuses there."""
    blocks = _decoder_blocks(model, None)
    paths = sorted({name for b in blocks for name, m in b.named_modules() if _is_linear(m)})
    names = {path.rsplit(".", 1)[-1] for path in paths}
    if getattr(getattr(model, "config", None), "model_type", None) in _MAMBA_MODEL_TYPES:
        names -= set(_MAMBA_REFUSED)
    found = [t for t in DEFAULT_TARGETS if t in names]
    chosen = found + [t for t in COMPANION_TARGETS if t in names] if found else sorted(names)
    return _unambiguous(model, chosen, paths)


def _unambiguous(model: nn.Module, targets: list[str], paths: list[str]) -> list[str]:
    """`targets` (the linears' last names), each lengthened to the shortest dotted suffix of the linears' `paths`
    in a block that matches no module that is not a linear: PEFT refused those. CTRL's `ffn` is a Sequential (its
    linears are "0" and "2", which matched the blocks `h.0` and `h.2`); Reformer's `dense` names its feed-forward module
    and the linear inside it."""
    others = [name for name, m in model.named_modules() if name and not _is_linear(m)]

    def clashes(target: str) -> bool:  # a list index alone would name a block of any model deep enough
        return target.isdigit() or any(target_matches(target, name) for name in others)

    result: list[str] = []
    for target in targets:
        if not clashes(target):
            result.append(target)
            continue
        for path in (p for p in paths if p.rsplit(".", 1)[-1] == target):
            parts = path.split(".")
            suffix = next((".".join(parts[-k:]) for k in range(2, len(parts) + 1)
                           if not clashes(".".join(parts[-k:]))), None)
            if suffix is not None and suffix not in result:
                result.append(suffix)
    return result


def default_exclude(model: nn.Module, targets: "list[str] | tuple[str, ...]") -> str | None:
    """PEFT `exclude_modules` (a regex) for the parts of `model` outside its decoder blocks that hold linears named
    like `targets`, or None: a multimodal model's vision tower (Gemma 3's SigLIP q/k/v_proj), which text training
    never runs, would otherwise get LoRA pairs that no step trains and every adapter carries. None for an
    encoder-decoder (T5, BART, Whisper): every step runs both stacks, and the longest list of blocks is one of them
    (T5's is a block's three layers), which left the other stack, or T5's other blocks, without LoRA."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    blocks = {id(b) for b in _decoder_blocks(model, None)}
    modules = dict(model.named_modules())
    block_names = [n for n, m in modules.items() if id(m) in blocks]
    if not block_names:
        return None

    def holds_a_block(prefix: str) -> bool:
        return any(b == prefix or b.startswith(prefix + ".") for b in block_names)

    prefixes = set()
    for name, module in modules.items():
        if (not name or not _is_linear(module) or any(name.startswith(b + ".") for b in block_names)
                or not any(target_matches(t, name) for t in targets)):
            continue
        parts = name.split(".")  # its highest ancestor that holds no decoder block: the tower, not the model
        prefixes.add(next(".".join(parts[:i]) for i in range(1, len(parts) + 1) if not holds_a_block(".".join(parts[:i]))))
    if not prefixes:
        return None
    return "(?:" + "|".join(re.escape(p) for p in sorted(prefixes)) + r")(?:\..*)?"


def _uses_conv1d(model: nn.Module, targets: list[str]) -> bool:
    return any(type(m).__name__ == "Conv1D" and any(target_matches(t, n) for t in targets)
               for n, m in model.named_modules())


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _swap_base_layers(targets: list[tuple[str, nn.Module]], recipe: Recipe, undo: "_Undo | None" = None,
                      device: "torch.device | None" = None) -> int:
    """Replace base layers by `SurogateLinear` (bf16 recipe: plain nn.Linear stays, traced as F.linear;
    `weight_packing` swaps a packed group's members later), built on `device` when given (the model is
    being moved there)."""
    swapped = 0
    for name, module in targets:
        base = module.base_layer
        if isinstance(base, SurogateLinear):
            continue
        if not _is_linear(base):
            continue  # reported as a fallback by the match pass (not a linear base GEMM)
        if recipe.name == "bf16" and type(base) is nn.Linear:
            continue  # traced as F.linear; subclasses (e.g. FalconLinear's `x @ W.T`) are swapped

        module.base_layer = SurogateLinear.from_linear(base, recipe, device)
        if undo is not None:
            undo.swapped.append((module, base))
        swapped += 1
    return swapped


def _decoder_blocks(model: nn.Module, targets: list[tuple[str, nn.Module]] | None) -> list[nn.Module]:
    """The longest ModuleList of blocks that each hold linears (the decoder layers). A hybrid's blocks may be of
    two classes (OLMo-hybrid: attention layers between gated-DeltaNet ones). In a multimodal model (a config with a
    text config of its own), the longest in its text decoder (`get_decoder()`): a vision tower may have more blocks
    (Qwen2-VL-7B's and Qwen2.5-VL-7B's 32 against 28, PaliGemma-3B's 27 against 18), and the default targets, the
    exclusion and the compiled blocks were the tower's, the language model left without LoRA."""
    config = getattr(model, "config", None)
    root = model
    if config is not None and hasattr(config, "get_text_config") and config.get_text_config() is not config:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        root = decoder if isinstance(decoder, nn.Module) else model
    best: list[nn.Module] = []
    for module in root.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        if not all(any(_is_linear(m) for m in block.modules()) for block in module):
            continue
        if len(module) > len(best):
            best = list(module)
    return best


# --- capture ------------------------------------------------------------------------------------------

CPU_BACKENDS = ("aot_eager", "inductor")


def cpu_backend(model: nn.Module | None = None) -> str:
    """What compiles the graphs of `arch="cpu"`: "aot_eager" (AOTAutograd running the aten ops as they are, seconds
    of compile) or "inductor" (the compiler the GPU runs, with its C++ codegen: minutes of compile, and a C++
    compiler needed). `SUROGATE_CPU_BACKEND` decides when set; otherwise "aot_eager", except for models with gated
    DeltaNet layers that `linear_attention.install` does not recognize: transformers' traced delta rule fails
    aot_eager's backward (a stride fault of torch's), which its op form (`surogate::gated_delta_rule`) avoids."""
    name = os.environ.get("SUROGATE_CPU_BACKEND")
    if name is None:
        return "inductor" if model is not None and linear_attention.unrecognized(model) else "aot_eager"
    if name not in CPU_BACKENDS:
        raise ValueError(f"SUROGATE_CPU_BACKEND={name!r}: use one of {', '.join(CPU_BACKENDS)} (or unset it)")
    return name


@contextlib.contextmanager
def backward_trace_flags(options: dict) -> Iterator[None]:
    """The op-level flags the ops' autograd formulas read while AOTAutograd traces them, set from the passes'
    options as they decided them: `ops.grad_producer` and `ops.save_input_q` (passes/save_fp8.py)."""
    with ops.grad_producer(options.get("grad_producer", True)), \
            ops.save_input_q(options.get("save_fp8_inputs") is True):
        yield


def make_backend(recipe: Recipe, arch: str, report: CompileReport, options: dict | None = None,
                 inductor: bool | None = None):
    """A Dynamo backend: run the surogate passes on the graph, then aot_eager or Inductor (`inductor`; by default
    Inductor on CUDA, and on the CPU when `cpu_backend()` says so).

    AOTAutograd traces the backward inside that call, running the ops' autograd formulas: the backend holds
    `backward_trace_flags` (`ops.grad_producer`, `ops.save_input_q`) around it, which is what the formulas read.
    """
    options = options or {}
    if inductor is None:
        inductor = arch != CPU or cpu_backend() == "inductor"

    def surogate_backend(gm: torch.fx.GraphModule, example_inputs):
        report.pending = ""
        ctx = PassContext(recipe, arch, report, dict(options))  # the passes write their decisions into its options
        _run_pipeline_in_checkpoint_bodies(gm, ctx)
        run_pipeline(gm, ctx)
        with backward_trace_flags(ctx.options):
            if not inductor:
                return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
            from torch._inductor.compile_fx import compile_fx

            post_grad = post_grad_pass()
            patches = {"post_grad_custom_post_pass": post_grad} if post_grad is not None else None
            # The passes tag nodes (node.meta), which the compile caches do not hash: the options as the passes
            # decided them (recompute_producers "auto" -> True / False) go into the key.
            options_tag = "surogate-options-" + ",".join(f"{k}={v}" for k, v in sorted(ctx.options.items()))
            with compile_options_cache_tag(options_tag):
                return compile_fx(gm, example_inputs, config_patches=patches)

    return surogate_backend


_REGION_IDS = itertools.count()
# Decoder-layer keyword arguments that carry a KV cache: a checkpoint replay would update it twice.
# transformers 5.x names it `past_key_values` (5.17) or `cache` (5.24); older models `layer_past`.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def _fresh_function(fn: types.FunctionType) -> types.FunctionType:
    """A copy of `fn` with its own code object: Dynamo caches per code object, so each compiled model
    gets its own cache (no recompile-limit pile-up across models in one process, no cross-model guards)."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}__surogate{next(_REGION_IDS)}")
    new = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def _run_pipeline_in_checkpoint_bodies(gm: torch.fx.GraphModule, ctx: PassContext) -> None:
    """Run the passes inside every activation-checkpoint region of `gm` (each a subgraph of its own).

    Dynamo captures a `torch.utils.checkpoint` call as `tag_activation_checkpoint(body, *inputs)`; the
    block's linears live in `body`, which the passes (they walk one graph) would not see. A body is part
    of the graph Dynamo handed over, so it does not count as a graph of its own in the report.
    """
    done = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.higher_order.tag_activation_checkpoint:
            continue
        body = getattr(gm, node.args[0].target)
        if id(body) in done:
            continue
        done.add(id(body))
        run_pipeline(body, dataclasses.replace(ctx, matches=[], rewritten=[]))
        ctx.report.graphs -= 1


def _compile_blocks(blocks: list[nn.Module], backend, dynamic: bool, checkpoint: "bool | str" = False,
                    offload: BlockInputOffload | None = None, checkpointed: int = 0) -> None:
    """Compile the blocks' shared forward once per block class; every block calls its class's (regional compilation).

    The sequence dimension of each call's tensors is marked dynamic, so one graph serves every length.
    With `checkpoint`, each call of the compiled graph by the first `checkpointed` blocks runs under `torch.utils.checkpoint` (eager, non-reentrant): the recompute in the backward calls the same
    compiled graph with the same guards; the other blocks call it plainly.
    With `offload`, the inputs that checkpoint saves go to its host buffers (block i: `offload.hooks(i)`).
    """
    shared = {cls: torch.compile(_fresh_function(cls.forward), backend=backend, dynamic=None)
              for cls in dict.fromkeys(type(b) for b in blocks)}
    for index, block in enumerate(blocks):
        def forward(*args, _block=block, _shared=shared[type(block)], **kwargs):
            if dynamic:
                _mark_sequence_dynamic(args, kwargs)
            with quiet_grad_reads():  # block 0's input is no leaf: Dynamo's read of its .grad under `-W error`
                return _shared(_block, *args, **kwargs)

        if checkpoint and index < checkpointed:
            forward = _checkpointed(forward, _draws_random(block), offload, index)
        block.forward = forward


def _checkpoint_blocks(blocks: list[nn.Module]) -> None:
    """Wrap each of `blocks`' forward in a checkpoint before the backbone is compiled (regional=False)."""
    for block in blocks:
        block.forward = _checkpointed(block.forward, _draws_random(block))


def _side_effects_not_replayed(compiled):
    """`compiled` (the backbone with checkpoint regions inside) traced with Dynamo's
    `skip_fwd_side_effects_in_bwd_under_checkpoint`: the layers' forward may set Python state that it restores
    before returning (with the `kernels` package, which transformers 5.25 installs, each attention layer sets and
    resets the hub-kernel routing table). Dynamo refuses such a side effect inside a checkpoint region unless told
    the recompute need not replay it, and otherwise falls back to eager for the whole backbone: nothing rewritten.
    The flag is set only while the backbone runs (traced lazily, on a call), not for the rest of the process."""
    @functools.wraps(compiled)
    def forward(*args, **kwargs):
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            return compiled(*args, **kwargs)

    return forward


def _draws_random(block: nn.Module) -> bool:
    """Whether `block` draws random numbers in training (dropout), which a recompute must replay.

    Only then does the checkpoint save and restore the RNG state: that read is a cost per block, and
    torch refuses it during CUDA-graph capture (surogate.GraphedStep)."""
    for module in block.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
        rate = getattr(module, "attention_dropout", 0.0)
        if isinstance(rate, (int, float)) and rate > 0:
            return True
    return False


def _checkpointed(fn, preserve_rng_state: bool = True, offload: BlockInputOffload | None = None, block: int = 0):
    """`fn` under non-reentrant activation checkpointing while autograd records and no KV cache is passed;
    with `offload`, the inputs the checkpoint saves (the positional ones) wait in its host buffers."""
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled() or any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
            return fn(*args, **kwargs)
        if offload is None:
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
                                                     preserve_rng_state=preserve_rng_state, **kwargs)
        with offload.hooks(block):
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
                                                     preserve_rng_state=preserve_rng_state, **kwargs)

    return forward


def _mark_sequence_dynamic(args: tuple, kwargs: dict) -> None:
    """Mark the sequence dims as dynamic: dim 1 of (B, S, ...) tensors, dims 2-3 of (B, h, S, S) masks."""
    hidden = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2 or hidden.shape[1] < 2:
        return
    seq = hidden.shape[1]

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            dims = (2, 3) if value.dim() == 4 else (1,) if value.dim() >= 2 else ()
            for d in dims:
                if value.shape[d] == seq:
                    torch._dynamo.maybe_mark_dynamic(value, d)
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)

    visit(args)
    visit(list(kwargs.values()))
