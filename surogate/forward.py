"""The HF model's forward as `surogate.compile` wraps it: segments for surogate attention, the chunked LM head +
loss, and HF's rules for `labels`.

Why a wrapper: the surogate attention implementation gets no mask from transformers (surogate/ops/attention.py),
so whatever computes the loss (the chunked op or HF's own head and loss) needs the segment ids of the call's
`position_ids` and 2-D `attention_mask` put into the layer kwargs first. Calls without labels (inference,
`generate()`) run HF's forward with the original implementation and transformers' own masks and KV cache.
"""

from __future__ import annotations

import contextlib
import dis
import inspect
import types
from collections.abc import Callable

import torch
from torch import Tensor, nn

from surogate.ops import attention
from surogate.kernels.reference import IGNORE_INDEX
from surogate.passes import CompileReport

# Logit scales: a number the forward multiplies or divides the logits by (Cohere's `logit_scale`, Granite's
# `logits_scaling` divides, HyperCLOVA X's multiplies). The chunked loss scales the hidden states by it instead
# (the same logits up to one bf16 rounding), read from the forward's bytecode which way.
_LOGIT_SCALE_ATTRS = ("logit_scale", "logits_scaling", "output_multiplier_scale")
# Operands of the forward's arithmetic around the head that the chunked loss models: Gemma's soft-capping (applied
# by the cross-entropy kernel) and the scales above.
_MODELLED_LOGIT_ATTRS = ("final_logit_softcapping", *_LOGIT_SCALE_ATTRS)


def attach_forward(hf: nn.Module, report: CompileReport, chunked_loss: bool = True) -> None:
    """Wrap `hf.forward`: `labels=` calls get the segment ids surogate attention reads, whichever loss runs,
    and with `chunked_loss` (where the head allows it) `surogate.ops.loss.lm_head_cross_entropy` (no full
    FP32 logits) instead of HF's head and loss."""
    config = getattr(hf, "config", None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    backbone = backbone_of(hf)
    own_attention = attention.original_implementation(hf) is not None
    refusal = attention.packing_refusal(hf)  # why packed rows cannot train here, if they cannot
    needs = attention.mask_needs(hf)
    token_types = own_attention and attention.masks_from_token_types(hf)
    token_labels = labels_are_next_tokens(hf)
    if not token_labels:  # no LM head to chunk: not a fallback
        report.note(f"loss: {type(hf).__name__}'s own head and loss, as in HF ({getattr(hf, 'loss_type', None)})")
    multiplier = _chunked_loss_multiplier(hf, head, backbone, report) if chunked_loss and token_labels else None
    chunked = multiplier is not None
    if not (own_attention or chunked or refusal):
        return  # nothing to route or refuse: HF's forward as it is
    softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if isinstance(weight, Tensor) else getattr(config, "vocab_size", None)
    original = hf.forward
    patched = _options_of_a_patched_forward(hf, original)
    if own_attention and backbone is not hf:
        _segment_direct_backbone_calls(hf, backbone, needs, token_types)
    positional = _positional_names(original)
    takes_use_cache = _accepts(original, "use_cache")

    def forward(self, *args, **kwargs):
        """HF's forward, its signature and positional order kept (Trainer keeps the dataset columns it names)."""
        if len(args) > len(positional):
            raise TypeError(f"forward() takes {len(positional)} positional arguments but {len(args)} were given")
        for name, value in zip(positional, args):
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument '{name}'")
            kwargs[name] = value
        return call(**kwargs)

    def call(input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        from surogate.ops.loss import lm_head_cross_entropy

        hf_loss = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}  # HF's loss reads it
        if labels is None or kwargs.get("return_dict") is False or kwargs.get("output_hidden_states"):
            with attention.uninstalled(hf), _eager_with_a_kv_cache(kwargs):  # inference: transformers' masks, cache
                return original(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **hf_loss, **kwargs)
        if token_labels:
            check_labels(labels, vocab)
            labels = unscored_after_padding(labels, attention_mask)
        if takes_use_cache:
            kwargs.setdefault("use_cache", False)
        if refusal and kwargs.get("position_ids") is not None and attention_mask is None:
            raise ValueError(f"{type(hf).__name__} {refusal}; pad the examples instead of packing them "
                             "(sample_packing: false)")
        # Token types (Gemma 3's images, PaliGemma's prefix) attend both ways in transformers' masks, which surogate's
        # causal segments would drop: such calls run the original attention with those masks (a dense mask).
        own_masks = token_types and kwargs.get("token_type_ids") is not None
        if own_attention and not own_masks:
            attention_mask = _segments_into(kwargs, attention_mask, input_ids, needs)
        masks = attention.uninstalled(hf) if own_masks else contextlib.nullcontext()
        if not chunked or _router_aux_loss(config, kwargs) or patched.intersection(kwargs):
            with masks, attention.segments_sent(kwargs):
                return original(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **hf_loss,
                                **kwargs)
        kwargs.pop("logits_to_keep", None)
        with masks, attention.segments_sent(kwargs):
            out = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out[0] if multiplier == 1.0 else out[0] * multiplier  # (h m) W^T = m (h W^T): the logit scale
        loss = lm_head_cross_entropy(hidden, head.weight, labels, bias=head.bias, softcap=softcap,
                                     num_items_in_batch=num_items_in_batch, max_trained=_bound(outer, labels))
        # No KV cache on this path (use_cache is off unless asked): the output carries none, and reading the
        # backbone's (`out.past_key_values`) is deprecated in transformers 5.
        return CausalLMOutputWithPast(loss=loss, logits=None)

    forward.__signature__ = _with_self(inspect.signature(original))
    if token_types:
        report.note("attention: calls with token_type_ids run transformers' masks (their image or prefix tokens "
                    "attend both ways; a dense mask), the others surogate's")
    outer = _outside_an_outer_compile(forward)
    hf.forward = types.MethodType(outer, hf)
    if not chunked:
        return
    outer.max_trained = None  # set by bound_trained_tokens; it goes with the wrapper when the model is unloaded
    what = "lm_head + cross-entropy: surogate::lm_head_ce_fused (gradients in the forward; eval: lm_head_ce), chunked"
    report.note(f"{what} (softcap {softcap})" if softcap else f"{what} (logits x {multiplier:g})" if multiplier != 1
                else what)
    if getattr(config, "output_router_logits", False):
        report.note("router load-balancing loss on (output_router_logits): calls with labels run HF's lm_head and "
                    "loss (full logits), which add it; set output_router_logits=False for the chunked head")


def _router_aux_loss(config: object, kwargs: dict) -> bool:
    """Whether HF's forward adds the MoE router's load-balancing loss to this call's loss (`output_router_logits`,
    the call's or the config's): the chunked head returns the LM loss alone, so such calls run HF's head and loss
    (full logits) instead of training the router without its balancing term."""
    asked = kwargs.get("output_router_logits")
    return bool(getattr(config, "output_router_logits", False) if asked is None else asked)


def _options_of_a_patched_forward(hf: nn.Module, forward: Callable) -> frozenset[str]:
    """Keyword options that a forward put on the instance before `compile` names and the class's forward does not
    (TRL's fused LM head, `fused_lm_head` and `shift_labels`, patched in by a trainer given `peft_config` before the
    model was compiled). Calls that pass one run that forward, with the segments: the chunked head skipped it, and
    TRL failed reading `log_probs` off the output (AttributeError)."""
    if getattr(forward, "__func__", None) is getattr(type(hf), "forward", None):
        return frozenset()
    own = inspect.signature(type(hf).forward).parameters
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(name for name, p in inspect.signature(forward, follow_wrapped=False).parameters.items()
                     if p.kind in keyword and name not in own)


def _positional_names(method: Callable) -> list[str]:
    """The names `method` (HF's bound forward) binds positional arguments to, in order."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(method).parameters.values() if p.kind in kinds]


def _accepts(method: Callable, name: str) -> bool:
    """Whether `method` takes the keyword `name` (by name or through `**kwargs`): a user's own module's forward may
    take neither, and failed on the `use_cache=False` the wrapper adds (TypeError)."""
    parameters = inspect.signature(method).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _with_self(signature: inspect.Signature) -> inspect.Signature:
    """`signature` (a bound method's) with `self` in front: the wrapper is bound, and `inspect` drops its first
    parameter. Trainer's `remove_unused_columns` keeps the dataset columns this names (it dropped `position_ids`,
    the wrapper naming only input_ids, attention_mask and labels)."""
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return signature.replace(parameters=[this, *signature.parameters.values()])


def _segment_direct_backbone_calls(hf: nn.Module, backbone: nn.Module, needs: attention.MaskNeeds,
                                   token_types: bool) -> None:
    """Calls of the backbone itself (TRL's fused LM head runs `model.base_model(...)` with packed rows'
    `position_ids`, skipping the CausalLM's forward) get the segment ids too, while surogate attention is
    installed: without them its layers attended across the packed examples (0.4 nats off on a tiny Llama).
    Calls from the wrapper above, which has put the segments in, and calls under `attention.uninstalled`
    (inference, transformers' masks) pass through; with `token_types` (`attention.masks_from_token_types`), a call
    passing `token_type_ids` runs transformers' masks, as through the wrapper (Gemma 3's image tokens both ways)."""
    inner = backbone.forward
    config = getattr(backbone, "config", None)

    def forward(*args, **kwargs):
        mask = kwargs.get("attention_mask")
        typed = token_types and kwargs.get("token_type_ids") is not None
        if (args or attention.SEGMENTS_KWARG in kwargs or kwargs.get("past_key_values") is not None
                or getattr(config, "_attn_implementation", None) != attention.IMPLEMENTATION
                or (not typed and kwargs.get("position_ids") is None and (mask is None or mask.dim() != 2))):
            return inner(*args, **kwargs)
        if typed:
            with attention.uninstalled(hf):
                return inner(**kwargs)
        kwargs["attention_mask"] = _segments_into(kwargs, mask, kwargs.get("input_ids"), needs)
        with attention.segments_sent(kwargs):
            return inner(**kwargs)

    backbone.forward = _outside_an_outer_compile(forward)


def _outside_an_outer_compile(wrapper: Callable) -> Callable:
    """`wrapper` run eagerly when the model is itself wrapped in `torch.compile` (Trainer's `torch_compile=True`,
    accelerate's `torch.compile(model)`): Dynamo tracing through it failed on the blocks' `maybe_mark_dynamic`, and
    would otherwise inline surogate's compiled blocks into a graph without its passes. The outer compile breaks
    its graph here; the blocks inside run surogate's compiled code as they do without it."""
    disabled = torch._dynamo.disable(wrapper)
    disabled.__signature__ = inspect.signature(wrapper)  # what Trainer reads (`remove_unused_columns`)
    return disabled


def bound_trained_tokens(model: nn.Module, max_trained: "int | Callable[[int], int] | None") -> bool:
    """Promise that no call of `model` (a surogate.compile'd model) with `labels` has more than `max_trained`
    tokens with a label (after the shift by one), or `max_trained(width)` for labels `width` tokens wide; the
    chunked LM head then runs on that many rows instead of every token (`surogate.ops.loss.trained_rows`: chat
    data with the prompt masked). A call that breaks the promise returns a NaN loss (its labelled tokens past the
    bound would be lost), so the bound must come from the data (the trainer's: `MicroBatches.labelled_bound`,
    over the run's batches). None lifts it.
    False where the model has no chunked head."""
    hf = getattr(getattr(model, "base_model", None), "model", model)
    wrapper = getattr(getattr(hf, "forward", None), "__func__", None)
    if not hasattr(wrapper, "max_trained"):
        return False
    wrapper.max_trained = max_trained if max_trained is None or callable(max_trained) else int(max_trained)
    return True


def _bound(forward: Callable, labels: Tensor) -> int | None:
    """The bound `bound_trained_tokens` set, for labels as wide as these (a function of the width: per shape,
    so one CUDA graph per shape keeps its rows)."""
    bound = forward.max_trained
    return bound(labels.shape[-1]) if callable(bound) else bound


def backbone_of(hf: nn.Module) -> nn.Module:
    """`hf.base_model`, or where its `base_model_prefix` names no child (Llama4ForCausalLM's says
    "language_model", its backbone is `model`) its one child that is a transformers model; `hf` when neither."""
    from transformers import PreTrainedModel

    backbone = getattr(hf, "base_model", hf)
    if backbone is hf:
        models = [child for child in hf.children() if isinstance(child, PreTrainedModel)]
        return models[0] if len(models) == 1 else hf
    return backbone


def _chunked_loss_multiplier(hf: nn.Module, head: "nn.Module | None", backbone: nn.Module,
                             report: CompileReport) -> float | None:
    """The number the chunked loss multiplies the hidden states by to give `hf`'s logits (1: none; a logit scale
    otherwise), or None where it does not model them (a linear head over a separate backbone, arithmetic between
    them it knows): then the report says why HF's head is kept."""
    config = getattr(hf, "config", None)
    set_scales = [a for a in _LOGIT_SCALE_ATTRS if getattr(config, a, None) not in (None, 1, 1.0)]
    other, scales = _arithmetic_around_the_head(hf, head, backbone) if head is not None and backbone is not hf \
        else (False, [])
    multiplier = _logit_multiplier(hf, scales)
    unread = [a for a in set_scales if a not in {attr for attr, _ in scales}]
    if head is None or backbone is hf or not isinstance(head, nn.Linear):
        why = "no separate backbone / linear output embedding"
    elif unread:
        why = f"config sets {unread}, which its forward does not apply as a multiplier or divisor of the logits"
    elif type(head).forward is not nn.Linear.forward:
        why = (f"its output embedding ({type(head).__name__}) computes its logits in a forward of its own (Dory's "
               "scales each token's logit), which the chunked loss would skip")
    elif not _head_reads_the_backbone(hf, head, backbone):
        why = (f"{type(hf).__name__}'s forward does not hand its backbone's output straight to its head (a prediction "
               "transform between them, as BERT's and Electra's)")
    elif "loss_function" not in attention.code_names(hf):
        why = (f"{type(hf).__name__}'s forward computes its own loss, not transformers' shifted causal-LM "
               "`loss_function` (CPM-Ant's and TrOCR's do not shift the labels)")
    elif other:
        why = (f"{type(hf).__name__}'s forward computes on the hidden states or the logits between its backbone, "
               "its head and its loss (Inkling divides the hidden states by a muP multiplier and cuts the logits "
               "to the unpadded vocabulary)")
    elif multiplier is None:
        why = f"its logit scale ({', '.join(a for a, _ in scales)}) is no number on the model or its config"
    elif multiplier != 1.0 and (getattr(config, "final_logit_softcapping", None) or head.bias is not None):
        why = "it scales its logits and also soft-caps them or has a head bias (not modelled together)"
    else:
        return multiplier
    report.fallbacks.append(("lm_head + cross-entropy", f"kept HF's (full logits): {why}"))
    return None


def _logit_multiplier(hf: nn.Module, scales: list[tuple[str, str]]) -> float | None:
    """The product of the logit scales `(attribute, "*" or "/")` the forward applies, each read from the model
    (Cohere keeps `self.logit_scale`), its config or the config's text_config; None where one is no number."""
    config = getattr(hf, "config", None)
    multiplier = 1.0
    for attr, op in scales:
        found = (vars(hf).get(attr), getattr(config, attr, None), getattr(getattr(config, "text_config", None), attr,
                                                                         None))
        value = next((v for v in found if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
        if value is None or value == 0:
            return None
        multiplier = multiplier * value if op == "*" else multiplier / value
    return float(multiplier)


def _head_reads_the_backbone(hf: nn.Module, head: nn.Module, backbone: nn.Module) -> bool:
    """Whether the head and the backbone are both children of `hf` that its forward calls by name, and it calls
    no other child that holds weights: the chunked loss computes `head(backbone(...)[0])`, which a head nested in
    a prediction module (BERT's `cls.predictions`: dense, activation and LayerNorm before the decoder) or a
    transform beside it (Electra's `generator_predictions`) would skip, a silently different loss."""
    read = attention.code_names(hf)
    children = {id(child): name for name, child in hf.named_children()}
    names = (children.get(id(head)), children.get(id(backbone)))
    others = [name for name, child in hf.named_children() if child is not head and child is not backbone
              and name in read and next(child.parameters(), None) is not None]
    return all(name is not None and name in read for name in names) and not others


def _arithmetic_around_the_head(hf: nn.Module, head: nn.Module, backbone: nn.Module
                                ) -> tuple[bool, list[tuple[str, str]]]:
    """(whether `hf`'s forward does arithmetic between reading its backbone and calling its loss that the chunked
    loss does not model, the logit scales it applies: `(attribute, "*" or "/")`). Modelled: Gemma's soft-capping
    (which the chunked loss applies) and a multiplication or division by one of `_LOGIT_SCALE_ATTRS`. The chunked
    loss computes `head(backbone(...)[0])` alone; slicing the hidden states to `logits_to_keep` (before the head)
    is a subscript it may skip."""
    code = getattr(inspect.unwrap(type(hf).forward), "__code__", None)
    names = {child: name for name, child in hf.named_children()}
    scales: list[tuple[str, str]] = []
    if code is None:
        return False, scales
    # Stages: before the backbone is read, the hidden states, the head's arguments (the head is loaded before
    # them: `self.lm_head(hidden_states[:, slice_indices, :])`, transformers < 5.2x, slices between the load and
    # the call), the logits (after the head's call).
    stage, previous = "before", None
    for instruction in dis.get_instructions(code):
        loads = instruction.opname in ("LOAD_ATTR", "LOAD_METHOD")
        if loads and stage == "before" and instruction.argval == names.get(backbone):
            stage = "hidden"
        elif loads and stage == "hidden" and instruction.argval == names.get(head):
            stage = "head arguments"
        elif stage == "head arguments" and instruction.opname.startswith("CALL"):  # the first call: the head's
            stage = "logits"
        elif loads and stage == "logits" and instruction.argval == "loss_function":
            return False, scales
        elif stage != "before" and instruction.opname in ("BINARY_OP", "BINARY_SUBSCR", "BINARY_SLICE"):
            subscript = instruction.opname != "BINARY_OP" or instruction.argrepr == "[]"  # 3.14: one opcode
            operand = previous.argval if previous is not None else None
            op = instruction.argrepr.rstrip("=")
            if operand in _LOGIT_SCALE_ATTRS and op in ("*", "/"):  # of the hidden states or the logits: the same
                scales.append((operand, op))
            elif operand not in _MODELLED_LOGIT_ATTRS and (stage == "logits" or not subscript):
                return True, scales
        previous = instruction
    return False, scales


def _eager_with_a_kv_cache(kwargs: dict) -> "contextlib.AbstractContextManager":
    """Calls that use a KV cache (`generate()`'s) run the blocks eagerly: compiled, each new cache state (its
    length, Gemma 2's sliding layers, the first call that fills it) recompiled a block, and a train / eval / generate
    loop reached Dynamo's recompile limit (8), after which a new training shape ran eagerly too. Decoding a token
    at a time gains little from the compiled blocks; training keeps its graphs."""
    if kwargs.get("past_key_values") is None and not kwargs.get("use_cache"):
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def labels_are_next_tokens(hf: nn.Module) -> bool:
    """Whether `hf`'s `labels` are causal-LM token ids, scored against the position before (HF's `ForCausalLMLoss`,
    also the default for a model of no known loss type): `check_labels` and `unscored_after_padding` are the rules of
    those. A classification or QA head's labels (a class or a float per row, a class per token, unshifted) were
    refused when float (regression, a reward model) or lost the first token of a left-padded row; so were those of
    a module of the user's own (not a `PreTrainedModel`: a head on `LlamaModel`, its loss computed in its forward)."""
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    if not isinstance(hf, PreTrainedModel):  # a user's own module (a head on a backbone): its labels and loss its own
        return False
    loss_type = getattr(hf, "loss_type", None)
    return loss_type not in LOSS_MAPPING or LOSS_MAPPING[loss_type] is ForCausalLMLoss


def check_labels(labels: Tensor, vocab: "int | None") -> None:
    """HF's rules for `labels`, checked before the compiled step: int64 always (a dtype costs nothing); the
    values (-100 or a token id below `vocab`) only when the labels are on the CPU, where reading them needs no
    device sync. On a GPU an out-of-vocabulary label gives a NaN loss (surogate/kernels/cross_entropy.py)."""
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 token ids (-100 where ignored), got {labels.dtype}; pass labels.long()")
    if labels.device.type != "cpu":
        return
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= (vocab or torch.iinfo(torch.int64).max)))
    if bad.any():
        raise ValueError(f"labels hold {labels[bad][0].item()}: a label is a token id in [0, {vocab}) or "
                         f"{IGNORE_INDEX} (ignored); mask prompt and padding tokens with {IGNORE_INDEX}")


def unscored_after_padding(labels: Tensor, attention_mask: "Tensor | None") -> Tensor:
    """`labels` with -100 wherever the token before is padding (a 2-D mask's 0): the first real token of a
    left-padded row. Its prediction comes from a padding position, which no implementation computes from the row:
    HF's SDPA gives that row no attention at all, HF's eager attention spreads it over the whole row (the very
    token it predicts included), surogate lets the padding attend to itself. So the loss equals HF's with that
    label masked, whatever the attention. Right-padded and unpadded rows are unchanged. No host sync."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape != labels.shape:
        return labels
    after_padding = torch.zeros_like(labels, dtype=torch.bool)
    after_padding[:, 1:] = attention_mask[:, :-1] == 0
    return labels.masked_fill(after_padding, IGNORE_INDEX)


def _segments_into(kwargs: dict, attention_mask: "Tensor | None", input_ids: "Tensor | None",
                   needs: attention.MaskNeeds) -> "Tensor | None":
    """Put the segment ids of `position_ids` / a 2-D `attention_mask`, and the FlexAttention masks the layers
    need, into the layer kwargs (surogate attention reads them); returns the mask to hand the backbone.

    A 2-D mask goes on to the backbone too: transformers builds no mask from it for the surogate implementation
    (no host sync), but some models derive their positions from it (OPT's learned positions: cumsum of the
    mask), and must get the ones HF computes. A prepared 4-D mask or BlockMask is the caller's own, passed through.
    """
    if attention_mask is not None and attention_mask.dim() != 2:
        return attention_mask
    segments = attention.segment_ids(kwargs.get("position_ids"), attention_mask)
    rows = next((t for t in (input_ids, kwargs.get("inputs_embeds"), segments) if t is not None), None)  # (B, S, ...)
    if rows is not None:
        attention.masks_into(kwargs, segments, rows.shape[1], rows.device, needs)
    return attention_mask
