"""Attention that keeps example boundaries and never syncs the host: packed rows, padding, CUDA graphs.

Why: Hugging Face builds the attention mask outside the model's layers, and the way it builds it
depends on whether it thinks it is tracing. Eagerly it inspects `position_ids` and the padding mask
with host syncs (`.all()`) and, for plain causal batches, passes no mask (SDPA's causal flash path);
under CUDA-graph capture it skips the inspection and materialises a dense mask. A graph captured
that way differs from its warm-up, recompiles inside the capture, and the capture fails (Llama,
Mistral, Phi3, GPT-2, ... : every model without a per-layer-type mask mapping).

`install(model)` registers one attention implementation, "surogate", in transformers'
`AttentionInterface` and points the model's config at it. transformers then builds no mask at all
(an implementation without a registered mask function gets `attention_mask=None`), and each
attention layer receives, through the layer kwargs, the tensor `surogate_segments` (B, S) that the
model's forward computed once from `position_ids` and the padding mask (`segment_ids`): a token
attends to the earlier tokens of its own segment. The decision between paths depends only on which
keyword arguments are present, never on tensor values, so warm-up, capture and replay agree:

- no segments (plain causal rows; right-padded rows with their padding masked from the loss), no window
  shorter than the rows, no soft-capping: the model's original implementation with `attention_mask=None`,
  i.e. SDPA's causal kernel (cuDNN's on Hopper with torch 2.11, bench/results/attention_backends_h200.md);
- segments, or rows longer than a sliding window (Phi-3's 2047 at 2048-token rows, Gemma 3's 512; not with
  soft-capped logits), on CUDA: FlexAttention with a BlockMask built once per forward (`masks_into`: blocks that
  cross an example or fall outside the window are skipped, so packed rows of short examples cost less attention
  than one long causal row; SDPA would need a dense mask). Windowed layers of packed rows get one mask of both;
- those cases elsewhere (CPU reference, dropout, `SUROGATE_ATTENTION=dense`): the original implementation
  with a dense mask built from the segments and the window.

Sliding windows (`sliding_window`), logit soft-capping (`softcap`, Gemma 2) and attention sinks (`s_aux`,
GPT-OSS: FlexAttention's output renormalized from its log-sum-exp) are applied on every path that has
segments or needs them. Architectures whose attention does not go through
`ALL_ATTENTION_FUNCTIONS` (Bloom, MPT, Falcon before transformers 5.25), whose layers do not hand the layer kwargs
on to it (StableLM, Falcon in 5.25), or whose attention is bidirectional (`is_causal = False`) keep transformers' own
masks: `install` returns None for them, and they pack only where those masks are built from the row's
`position_ids` (`own_masks_keep_examples_apart`). `packing_refusal` says where packed rows cannot train as their
examples alone, and why (masks built without the positions, decoders that count their positions themselves, Mamba
mixers that carry state).
"""

from __future__ import annotations

import ast
import dis
import functools
import inspect
import os
import re
import sys
import textwrap
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

IMPLEMENTATION = "surogate"
SEGMENTS_KWARG = "surogate_segments"
BLOCK_MASK_KWARG = "surogate_block_mask"
WINDOW_MASK_KWARG = "surogate_window_block_mask"
# Attribute set on the model and its attention modules: the implementation that ran before `install`
# (what no-segment calls use). Not on the config, which `save_pretrained` would write out.
_ORIGINAL_ATTR = "_surogate_original_attn_implementation"
# Set on cross-attention layers (`_is_cross_attention`): they run their original implementation with their own mask.
_CROSS_ATTR = "_surogate_cross_attention"


def segment_ids(position_ids: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor | None:
    """(B, S) int32 segment of every token, or None when neither input is given (plain causal rows).

    From `position_ids` (Hugging Face's padding-free convention, as `DataCollatorWithFlattening`
    writes it): a new segment starts wherever a position is not the previous one plus one, so
    positions restarting at 0 open a new example. From a 2-D `attention_mask`: padded tokens
    (mask 0) get segment -1, so no real token attends to them and they attend only to each other
    (no fully masked row, no NaN). Pure tensor ops: no host sync, capturable.
    """
    seg = None
    if position_ids is not None and position_ids.dim() == 3:
        # M-RoPE (Qwen2-VL and kin): (3, B, S) temporal / height / width positions, which an image's tokens do not
        # count up by one, mark no examples (nor do they in transformers); (4, B, S) leads with the text positions,
        # transformers' packing convention. Flattened, they gave a (1, 3 B S) row of segments.
        position_ids = position_ids[0] if position_ids.shape[0] == 4 else None
    if position_ids is not None:
        pos = position_ids if position_ids.dim() == 2 else position_ids.view(1, -1)
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        seg = starts.to(torch.int32).cumsum(-1, dtype=torch.int32)
    if attention_mask is not None and attention_mask.dim() == 2:
        keep = attention_mask.to(torch.bool)
        if seg is None:
            seg = torch.zeros(keep.shape, dtype=torch.int32, device=keep.device)
        elif seg.shape[0] != keep.shape[0]:
            seg = seg.expand(keep.shape[0], -1)
        seg = torch.where(keep, seg, torch.full_like(seg, -1))
    return seg


def uses_flex(device: torch.device) -> bool:
    """Whether segments run through FlexAttention on `device` (CUDA unless SUROGATE_ATTENTION=dense)."""
    return device.type == "cuda" and os.environ.get("SUROGATE_ATTENTION", "flex") != "dense"


@dataclass(frozen=True)
class MaskNeeds:
    """What a model's attention layers need beyond SDPA's causal kernel, read from its config at compile time."""

    window: int | None  # the sliding window of its windowed layers (None: none)
    softcap: bool  # soft-capped attention logits (Gemma 2)

    def window_mask(self, seq_len: int) -> int | None:
        """The window for which rows of `seq_len` tokens (plain or packed) get a FlexAttention mask: one shorter than
        the rows (Phi-3's 2047 at 2048 tokens; run 98: +19% tokens/s), not with soft-capping (Gemma 2: FlexAttention
        measured slower than its eager path at head dim 256, and failed to lower at head dim 64 under
        torch 2.11)."""
        if self.softcap or self.window is None or seq_len <= self.window:
            return None
        return self.window


def mask_needs(model: nn.Module) -> MaskNeeds:
    """`MaskNeeds` from the config: `sliding_window` where the model uses it (not with `use_sliding_window: false`,
    nor when `layer_types` names no sliding layer), `attn_logit_softcapping`."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if getattr(config, "use_sliding_window", True) is False or (layer_types and "sliding_attention" not in layer_types):
        window = None
    return MaskNeeds(window, bool(getattr(config, "attn_logit_softcapping", None)))


def block_mask(segments: Tensor | None, seq_len: int, window: int | None, device: torch.device):
    """FlexAttention's BlockMask: causal, inside `window` (q - k < window, as transformers' sliding layers) when
    given, inside each segment when given. Built once per forward outside the compiled layers (tensor ops only:
    capturable); every layer it fits reuses it. Blocks wholly outside it are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        if segments is None:
            return _keep(q_idx, kv_idx, window)
        return _keep(q_idx, kv_idx, window, segments[b, q_idx], segments[b, kv_idx])

    batch = None if segments is None else segments.shape[0]
    return create_block_mask(mask_mod, batch, None, seq_len, seq_len, device=device)


def masks_into(kwargs: dict, segments: Tensor | None, seq_len: int, device: torch.device, needs: MaskNeeds) -> None:
    """Put the call's segments and, on CUDA, the BlockMasks its layers will use into the layer kwargs: with
    segments the document mask; `(window, mask)` for windowed layers when `needs.window_mask` says the window is
    shorter than the rows (with segments, window and document mask together). Plain rows otherwise get none
    (SDPA's causal kernel)."""
    if segments is not None:
        kwargs[SEGMENTS_KWARG] = segments
    if not uses_flex(device):
        return
    if segments is not None:
        kwargs[BLOCK_MASK_KWARG] = block_mask(segments, seq_len, None, device)
    window = needs.window_mask(seq_len)
    if window is not None:
        kwargs[WINDOW_MASK_KWARG] = (window, block_mask(segments, seq_len, window, device))


def supports(model: nn.Module) -> bool:
    """Whether surogate attention can serve `model`: its attention layers call through transformers'
    `ALL_ATTENTION_FUNCTIONS` (so that registering an implementation reaches them), every module on the way to
    them passes its keyword arguments on (so the segments reach them: `passes_layer_kwargs`), they are causal
    (an encoder's bidirectional attention, BERT's and its kin's unless `is_decoder`, must not become causal), no
    sparse-attention indexer reads transformers' mask itself (DeepSeek-V3.2, GLM-MoE-DSA, HY-V4: it failed on the
    None mask surogate leaves), and the model can switch implementation."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return False
    if not _defined_with_attention_functions(type(model)):
        return False
    readers = _segment_readers(model).values()
    return (passes_layer_kwargs(model) and all(getattr(m, "is_causal", True) is not False for m in readers)
            and not any(isinstance(getattr(m, "indexer", None), nn.Module) for m in readers))


def _defined_with_attention_functions(cls: type) -> bool:
    """Whether `cls`, or a model class it subclasses, is defined in a module that holds `ALL_ATTENTION_FUNCTIONS`.
    The base classes count: remote code (`trust_remote_code`) that subclasses transformers' Llama lives in a module
    of its own that imports only `LlamaForCausalLM`. transformers' `PreTrainedModel` and above do not count (its
    module holds the registry for every model)."""
    from transformers import PreTrainedModel

    for base in cls.__mro__:
        if base is PreTrainedModel:
            return False
        module = sys.modules.get(base.__module__)
        if module is not None and "ALL_ATTENTION_FUNCTIONS" in vars(module):
            return True
    return False


def reads_position_ids(model: nn.Module) -> bool:
    """Whether `model`'s text decoder takes `position_ids`: a packed row's positions restart at each example only
    there. Decoders that count positions themselves (BART's and its kin's learned positions) would give a packed
    example the positions of where it sits in the row."""
    forward = inspect.unwrap(type(_decoder(model)[0]).forward)
    try:
        return "position_ids" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # not a Python function: nothing to read
        return False


# transformers' causal mask builders (masking_utils): handed the row's `position_ids` and no padding mask, they find
# the packed examples in it (`find_packed_sequence_indices`) and keep each one's tokens to itself.
_PACKING_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")
# The implementations that apply those masks; FlashAttention takes none (the examples would reach it only through
# the layer kwargs, which are what these models drop).
_MASKED_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")
# A call that builds a mask (`create_causal_mask`, `_update_causal_mask`, `_prepare_4d_attention_mask`, ...), not one
# that uses one (`masked_fill`).
_MASK_BUILDER = re.compile(r"(create|make|prepare|update|build|get|compute)_\w*mask", re.IGNORECASE)


def own_masks_keep_examples_apart(model: nn.Module) -> bool:
    """Whether transformers' own masks keep packed examples apart on `model` (where surogate attention cannot serve
    it): its text decoder builds them from the row's `position_ids` (`_masks_built_from_positions`) and its
    attention implementation applies them. Falcon (transformers 5.25), StableLM, Nemotron, GPT-Neo and
    DeepSeek-V3.2 do; Bloom and MPT build theirs without the positions (ALiBi), so their packed examples would
    attend to each other."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return implementation in _MASKED_IMPLEMENTATIONS and _masks_built_from_positions(model)


def _masks_built_from_positions(model: nn.Module) -> bool:
    """Whether `model`'s text decoder builds every mask with transformers' causal builders and hands each the row's
    `position_ids` (by keyword, or in a dict literal it unpacks). Read from the forward's source: a decoder without
    Python source, or one that builds any mask another way, is taken as not doing so."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(type(_decoder(model)[0]).forward))))
    except (OSError, TypeError, SyntaxError):
        return False
    dict_keys = {node.targets[0].id: {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
                 for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                 and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)}

    def called(call: ast.Call) -> str:
        return getattr(call.func, "id", None) or getattr(call.func, "attr", "")

    def hands_positions(call: ast.Call) -> bool:
        return any(kw.arg == "position_ids" or kw.arg is None and isinstance(kw.value, ast.Name)
                   and "position_ids" in dict_keys.get(kw.value.id, ()) for kw in call.keywords)

    builders = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _MASK_BUILDER.search(called(n))]
    return bool(builders) and all(called(n) in _PACKING_MASK_BUILDERS and hands_positions(n) for n in builders)


def masks_from_token_types(model: nn.Module) -> bool:
    """Whether `model`, or a module above its text decoder, builds transformers' masks from `token_type_ids` so that
    tokens attend both ways inside a block (Gemma 3's image tokens, PaliGemma's image and prompt prefix:
    `block_sequence_ids`, an `or_mask_function`). Surogate attention is causal: calls that pass token types run
    transformers' masks instead. Read from the forwards' source."""
    for module in _decoder_and_above(model)[1]:
        try:
            source = inspect.getsource(inspect.unwrap(type(module).forward))
        except (OSError, TypeError):
            continue
        if "token_type_ids" in source and ("block_sequence_ids" in source or "or_mask_function" in source):
            return True
    return False


def packing_refusal(model: nn.Module) -> str | None:
    """Why packed rows (examples end to end, `position_ids` restarting) cannot train on `model` as its examples
    would alone, or None when they can."""
    if not supports(model) and not own_masks_keep_examples_apart(model):
        if _masks_built_from_positions(model):
            implementation = getattr(model.config, "_attn_implementation", None)
            return (f"keeps transformers' own attention masks, which its attention implementation ({implementation}) "
                    "does not apply (its attention cannot take surogate's segment ids), so packed examples would "
                    "attend to each other; load it with attn_implementation='sdpa' to pack")
        return ("keeps transformers' own attention masks, built without the row's position_ids (its attention "
                "cannot take surogate's segment ids), so packed examples would attend to each other")
    if not reads_position_ids(model):
        return ("counts its positions itself (its decoder takes no position_ids), so a packed example would get "
                "the positions of where it sits in the row")
    mixers = unsegmented_mixers(model)
    if mixers:
        return (f"has layers that carry state from token to token without surogate's segment ids ({', '.join(mixers)}: "
                "a causal convolution, a state-space scan, a linear attention of its own), so a packed example would "
                "start from the one before it")
    return None


def unsegmented_mixers(model: nn.Module) -> list[str]:
    """The classes of the token mixers in `model`'s decoder blocks that carry state along the row and read no
    segments: those that own a causal convolution (`nn.Conv1d`: Mamba's and Mamba-2's mixers in Falcon-H1, Jamba,
    Bamba, LFM2's short convolution), except the gated DeltaNet layers, which surogate gives the segments; and a
    block with no layer that reads them, in a list of blocks where others have one (MiniMax's lightning attention:
    a linear attention of its own, whose state would run on from one packed example into the next)."""
    found = set()
    for blocks in (child for child in _decoder(model)[0].children() if isinstance(child, nn.ModuleList)):
        readers = [[name for name, m in block.named_modules() if _reads_segments(m)] for block in blocks]
        where = {name for names in readers for name in names}  # where the other blocks hold their attention
        for block, names in zip(blocks, readers):
            if where and not names:
                modules = dict(block.named_modules())
                mixer = next((modules[n] for n in sorted(where) if n and n in modules), block)
                if not _FEED_FORWARD.search(type(mixer).__name__):  # Nemotron-H's MLP-only blocks mix no tokens
                    found.add(type(mixer).__name__)
            for module in block.modules():
                if any(isinstance(c, nn.Conv1d) for c in module.children()) and not _reads_segments(module):
                    found.add(type(module).__name__)
    return sorted(found)


_FEED_FORWARD = re.compile(r"MLP|MoE|Moe|Experts|FeedForward|FFN")

# Globals whose use marks a layer that reads the segments: softmax attention through transformers' functions, and
# the gated DeltaNet layers' chunked rule (ops/linear_attention.py).
_SEGMENT_READERS = ("ALL_ATTENTION_FUNCTIONS", "torch_chunk_gated_delta_rule")


def _decoder(model: nn.Module) -> tuple[nn.Module, str]:
    """`model`'s text decoder (`get_decoder()`: the language model of a vision-language model) and the prefix of
    its modules' names."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    prefix = next((f"{name}." if name else "" for name, m in model.named_modules() if m is decoder), "")
    return decoder, prefix


def _decoder_and_above(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """`model`'s text decoder and the modules above it, `model` first (a vision-language model and its language
    model wrapper: what builds the decoder's masks), the towers beside it left out."""
    decoder, prefix = _decoder(model)
    return decoder, [m for name, m in model.named_modules() if name == "" or prefix.startswith(f"{name}.")]


def _segment_readers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers that read the segments in the text decoder's blocks (its ModuleLists; a vision tower, or an
    audio encoder inside the embeddings, gets no segments), by name."""
    decoder, prefix = _decoder(model)
    blocks = tuple(f"{prefix}{name}." for name, child in decoder.named_children() if isinstance(child, nn.ModuleList))
    return {name: m for name, m in model.named_modules() if name.startswith(blocks or prefix) and _reads_segments(m)}


def _reads_segments(module: nn.Module) -> bool:
    """Whether `module`'s forward reads one of `_SEGMENT_READERS`."""
    return any(g in code_names(module) for g in _SEGMENT_READERS)


def passes_layer_kwargs(model: nn.Module) -> bool:
    """Whether the layer kwargs given to `model` reach the layers that read the segments (`_segment_readers`):
    each module from the model down to every such layer hands its `**kwargs` to a call. Falcon in transformers
    5.25 calls the attention functions but its backbone and decoder layers drop their kwargs, and StableLM's
    decoder layers do: the segments would never arrive, and packed or padded rows would attend across examples."""
    modules = dict(model.named_modules())
    readers = _segment_readers(model)
    on_the_way = {type(modules[".".join(path[:i])]) for path in (r.split(".") for r in readers)
                  for i in range(len(path) + 1)}
    containers = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
    return bool(readers) and all(_passes_its_kwargs(cls.forward) for cls in on_the_way if not issubclass(cls, containers))


def code_names(module: nn.Module) -> tuple[str, ...]:
    """The global and attribute names `module`'s class forward reads (empty when it is not Python code)."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    return code.co_names if code is not None else ()


def _passes_its_kwargs(forward: Any) -> bool:
    """Whether `forward` takes `**kwargs` and passes them to a call (loads them and calls with ** unpacking)."""
    code = getattr(inspect.unwrap(forward), "__code__", None)
    if code is None or not code.co_flags & inspect.CO_VARKEYWORDS:
        return False
    name = code.co_varnames[code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & inspect.CO_VARARGS)]
    loaded = unpacked = False
    for instruction in dis.get_instructions(code):
        value = instruction.argval
        if instruction.opname.startswith("LOAD_FAST") and (value == name or isinstance(value, tuple) and name in value):
            loaded = True
        unpacked |= instruction.opname == "CALL_FUNCTION_EX"
    return loaded and unpacked


def install(model: nn.Module) -> str | None:
    """Switch `model` (a HF PreTrainedModel) to the "surogate" implementation; returns the original
    implementation's name, or None when the architecture is not supported (left unchanged)."""
    if not supports(model):
        return None
    if getattr(model, _ORIGINAL_ATTR, None) is not None:
        return getattr(model, _ORIGINAL_ATTR)
    _register()
    original = model.config._attn_implementation or "sdpa"
    if original == IMPLEMENTATION:  # a config already pointed at surogate: its own original is unknown, never itself
        original = "sdpa"
    for module in model.modules():
        if module is model or "Attention" in type(module).__name__:
            setattr(module, _ORIGINAL_ATTR, original)
            if _is_cross_attention(module):
                setattr(module, _CROSS_ATTR, True)
    _set_implementation(model, IMPLEMENTATION)
    return original


def _is_cross_attention(module: nn.Module) -> bool:
    """Whether `module` attends from the text to another sequence (Mllama's text cross-attention reads the image's
    `cross_attention_states`): its keys are not the queries' tokens, so neither causality nor the segments apply."""
    try:
        parameters = inspect.signature(inspect.unwrap(type(module).forward)).parameters
    except (TypeError, ValueError):
        return False
    return "CrossAttention" in type(module).__name__ or "cross_attention_states" in parameters


def original_implementation(model: nn.Module) -> str | None:
    """The implementation `install` replaced (None when it did not)."""
    return getattr(model, _ORIGINAL_ATTR, None)


class uninstalled:
    """`with uninstalled(model):` runs calls with the original implementation (inference and generation,
    where transformers' own masks for KV caches and padding are wanted)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.original = model, original_implementation(model)

    def __enter__(self) -> None:
        if self.original is not None:
            _set_implementation(self.model, self.original)

    def __exit__(self, *exc: object) -> None:
        if self.original is not None:
            _set_implementation(self.model, IMPLEMENTATION)


def _set_implementation(model: nn.Module, name: str) -> None:
    """Point the text decoder's configs (`_configs`) at `name`, each alone: transformers' setter would pass a plain
    name on to the sub-configs, a vision tower's among them."""
    for cfg in _configs(model):
        cfg._attn_implementation = {"": name}


_CONFIGS: "weakref.WeakKeyDictionary[nn.Module, list[Any]]" = weakref.WeakKeyDictionary()


def _configs(model: nn.Module) -> list[Any]:
    """The configs the text decoder's attention and masks read, each once: those of the decoder's modules and of
    the modules above it (a vision-language model's own). A vision tower's or audio encoder's keeps its
    implementation: its attention is bidirectional and gets no segments (switched, an eager SigLIP or Qwen2-VL
    tower became causal, and a padded batch's text segments reached its layers through the kwargs). Found once a
    model: `uninstalled` asks on every generate step, and the walk over the modules took ~1 ms on an 8B model."""
    if model not in _CONFIGS:
        _CONFIGS[model] = _decoder_configs(model)
    return _CONFIGS[model]


def _decoder_configs(model: nn.Module) -> list[Any]:
    decoder, above = _decoder_and_above(model)
    seen, out = set(), []
    for module in (*above, *decoder.modules()):
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


@functools.lru_cache(maxsize=None)
def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, surogate_attention)


def _original_function(module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(module, _ORIGINAL_ATTR, "sdpa")
    if name == "eager":  # the modeling file's own eager function (softcap and all)
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is not None:
            return name, fn
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return "sdpa", sdpa_attention_forward
    return name, ALL_ATTENTION_FUNCTIONS[name]


def _keep(q_idx: Tensor, kv_idx: Tensor, window: int | None, seg_q: Tensor | None = None,
          seg_k: Tensor | None = None) -> Tensor:
    """Whether query `q_idx` attends to key `kv_idx`: causal, inside `window` (q - k < window, as transformers'
    sliding layers) when given, inside one segment when given. The one rule of the BlockMask and the dense mask."""
    keep = kv_idx <= q_idx
    if window is not None:
        keep = keep & (q_idx - kv_idx < window)
    if seg_q is not None:
        keep = keep & (seg_q == seg_k)
    return keep


def _within(mask: Tensor, keep: Tensor) -> Tensor:
    """`mask` (bool: True attends; or additive float) restricted to the pairs `keep` allows. A layer that builds
    its own mask from transformers' (None under surogate) would otherwise lose causality and the segments."""
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)


def _allowed(segments: Tensor | None, q_len: int, kv_len: int, window: int | None, device) -> Tensor:
    """(B or 1, 1, S, S) bool: `_keep` over every (query, key) pair."""
    q = torch.arange(q_len, device=device)[None, None, :, None]
    k = torch.arange(kv_len, device=device)[None, None, None, :]
    if segments is None:
        return _keep(q, k, window)
    return _keep(q, k, window, segments[:, None, :, None], segments[:, None, None, :])


_FLEX_KERNEL_OPTIONS = {"FORCE_USE_FLEX_ATTENTION": True}


def _flex(query: Tensor, key: Tensor, value: Tensor, block_mask, scaling: float | None,
          softcap: float | None, sinks: Tensor | None = None) -> Tensor:
    """FlexAttention over a prepared document BlockMask; output (B, S, H, D).

    `sinks (H,)`: GPT-OSS's attention sinks (`s_aux`), one extra logit per head in every query's softmax whose
    value is dropped (its eager function). FlexAttention has no such column, so the output is renormalized from
    its log-sum-exp, as transformers' flex integration does: `out * sum / (sum + exp(sink)) = out * sigmoid(lse -
    sink)`; differentiable through the LSE (FlexAttention's backward takes its gradient), so q, k, v and the sinks
    get theirs."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    score_mod = None
    if softcap:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap

    # FORCE_USE_FLEX_ATTENTION: rows shorter than 128 tokens would take Inductor's flex-decoding kernel, built for
    # inference, which found no valid config (NoValidChoicesError) at head dim 64 on the H200 (torch 2.11, NOTES
    # run 99).
    kwargs = {"score_mod": score_mod, "block_mask": block_mask, "scale": scaling,
              "enable_gqa": query.shape[1] != key.shape[1], "kernel_options": _FLEX_KERNEL_OPTIONS}
    if sinks is None:
        out = flex_attention(query, key, value, **kwargs)
    else:
        out, aux = flex_attention(query, key, value, return_aux=AuxRequest(lse=True), **kwargs)
        keep = torch.sigmoid(aux.lse - sinks.float().view(1, -1, 1))  # (B, H, S) FP32; a fully masked row: 0
        out = (out.float() * keep.unsqueeze(-1)).to(query.dtype)
    return out.transpose(1, 2).contiguous()


_segments_sent = False  # True while a call runs whose layer kwargs carry segments (`segments_sent`)


class segments_sent:
    """`with segments_sent(kwargs):` around a model call whose layer kwargs may carry the segments: while it
    runs, a layer that reads segments and gets none raises (`check_segments_arrived`) instead of attending across
    examples. `passes_layer_kwargs` keeps the architectures known to drop kwargs off surogate attention; this
    catches the ones it cannot see. Read (and guarded by Dynamo) only where a layer got no segments."""

    def __init__(self, kwargs: dict) -> None:
        self.sent = SEGMENTS_KWARG in kwargs

    def __enter__(self) -> None:
        global _segments_sent
        self.before, _segments_sent = _segments_sent, self.sent

    def __exit__(self, *exc: object) -> None:
        global _segments_sent
        _segments_sent = self.before


def check_segments_arrived(layer: str, segments: Tensor | None) -> None:
    """Raise when the running call sent segments and `layer` (one that reads them) got none."""
    if segments is None and _segments_sent:
        raise ValueError(f"{layer} got no segment ids: this architecture's layers do not pass their "
                         "keyword arguments on, so packed or left-padded rows would attend across examples; train "
                         "on right-padded rows without packing (sample_packing: false) and report the architecture")


def surogate_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                       dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """The "surogate" entry of `ALL_ATTENTION_FUNCTIONS`: query (B, H, S, D), key/value (B, Hkv, S, D) ->
    ((B, S, H, D), None). transformers builds no mask for this implementation; the segments come as the
    `surogate_segments` kwarg. A 4-D mask that arrives anyway (built by the layer itself, as Doge's dynamic mask,
    or the caller's) is kept where it is causal, within the window and within a segment."""
    segments = kwargs.pop(SEGMENTS_KWARG, None)
    if getattr(module, _CROSS_ATTR, False):  # keys from another sequence: its own mask (Mllama's images), as is
        kwargs.pop(BLOCK_MASK_KWARG, None)
        kwargs.pop(WINDOW_MASK_KWARG, None)
        return _original_function(module)[1](module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, **kwargs)
    check_segments_arrived(type(module).__name__, segments)
    causal_mask = kwargs.pop(BLOCK_MASK_KWARG, None)
    windowed = kwargs.pop(WINDOW_MASK_KWARG, None)
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    name, original = _original_function(module)
    q_len, kv_len = query.shape[2], key.shape[2]
    window_matters = window is not None and kv_len > window
    if isinstance(attention_mask, Tensor):  # a 4-D mask the layer built (Doge's dynamic mask) or the caller gave
        keep = _allowed(segments, q_len, kv_len, window if window_matters else None, query.device)
        return original(module, query, key, value, _within(attention_mask[..., :kv_len], keep), dropout=dropout,
                        scaling=scaling, **kwargs)
    if attention_mask is not None:  # the caller's own BlockMask: theirs, as is
        return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if segments is None and not window_matters and name != "eager" and not softcap:
        return original(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if window_matters:  # the windowed mask, if it was built for this layer's window
        flex_mask = windowed[1] if windowed is not None and windowed[0] == window else None
    else:
        flex_mask = causal_mask
    if flex_mask is not None and dropout == 0.0 and q_len == kv_len:
        return _flex(query, key, value, flex_mask, scaling, softcap, kwargs.get("s_aux")), None
    keep = _allowed(segments, q_len, kv_len, window if window_matters else None, query.device)
    if name == "eager":  # additive float mask, as the eager functions expect
        mask = torch.zeros(keep.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~keep, torch.finfo(query.dtype).min)
        return original(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    return original(module, query, key, value, keep, dropout=dropout, scaling=scaling, **kwargs)
