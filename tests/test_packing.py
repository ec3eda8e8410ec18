"""Packed rows keep their example boundaries: per-token losses of a packed row equal those of its
examples run alone, on CPU, through `surogate.compile`'s attention (surogate/ops/attention.py).

A packed row here is several examples laid end to end with `position_ids` restarting at 0 (Hugging
Face's padding-free convention). Attending across examples changes every token after the first
example, by far more than bf16 rounding: each test checks that case too, so it could fail.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
import transformers as T
from test_compile_models import V, tiny_config

import surogate
from surogate.ops.attention import segment_ids
from surogate.compiler import _attach_lora
from surogate.forward import backbone_of

LENGTHS = (5, 9, 7)


@functools.cache
def _compiled(name: str):
    """One compiled model per architecture, shared by the tests: they run forwards only."""
    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(tiny_config(name)).to(torch.bfloat16)
    return surogate.compile(_attach_lora(base, {"r": 8, "lora_alpha": 16, "init_lora_weights": False}),
                            recipe="bf16", arch="cpu")


def _token_losses(model, **inputs) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of the compiled model's labels path, from the backbone's output."""
    hf = model.base_model.model
    grabbed = {}
    hook = backbone_of(hf).register_forward_hook(lambda m, i, out: grabbed.__setitem__("h", out[0]))
    try:
        model(**inputs)
    finally:
        hook.remove()
    logits = hf.get_output_embeddings()(grabbed["h"]).float()
    labels = inputs["labels"]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none",
                           ignore_index=-100).view(labels.shape[0], -1)


def _row(generator: torch.Generator):
    examples = [torch.randint(1, 100, (n,), generator=generator) for n in LENGTHS]
    row = torch.cat(examples)[None]
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    labels = row.clone()
    starts = torch.tensor([0, *LENGTHS[:-1]]).cumsum(0)
    labels[0, starts] = -100  # no target across a boundary (DataCollatorWithFlattening does the same)
    return examples, row, positions, labels


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _packed_alone_crossing(model, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token losses of one packed row (with its position_ids), of its examples each alone, and of the row as
    one long sequence (no position_ids), at the tokens that have a target within their example."""
    examples, row, positions, labels = _row(torch.Generator().manual_seed(seed))
    packed = _token_losses(model, input_ids=row, labels=labels, position_ids=positions)[0]
    alone = torch.cat([torch.cat([torch.zeros(1), _token_losses(model, input_ids=e[None], labels=e[None])[0]])
                       for e in examples])[1:]  # each example's first token has no target
    crossing = _token_losses(model, input_ids=row, labels=labels)[0]
    keep = labels[0, 1:] != -100
    return packed[keep], alone[keep], crossing[keep]


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "opt"])
def test_packed_row_losses_equal_each_example_alone(name):
    """llama (sdpa), gemma2 (eager attention with softcap and sliding windows), gpt2 and opt (learned
    positions, read from position_ids)."""
    packed, alone, crossing = _packed_alone_crossing(_compiled(name), seed=1)
    assert _max_diff(packed, alone) < 0.03  # nats; bf16 activations: rounding only
    assert _max_diff(crossing, alone) > 0.1  # attending across examples is caught


@pytest.mark.parametrize("name", ["stablelm", "gpt_neo", "falcon", "bloom", "mpt"])
def test_transformers_own_masks_keep_packed_examples_apart_where_they_are_given_the_positions(name):
    """Where surogate attention cannot serve a model (its layers drop the layer kwargs: StableLM, Falcon in
    transformers 5.25; or its attention is its own: GPT-Neo's local layers, Bloom, MPT), transformers' masks stay.
    StableLM and GPT-Neo (and Falcon from 5.25) build them with transformers' causal builders from the row's
    position_ids, which find the packed examples: packed rows train as their examples alone (they were refused
    before). Bloom and MPT build theirs without the positions (ALiBi), so packed examples would attend to each
    other (0.07 and 0.09 nats a token in bench/arch_survey.py): refused, with a message that says to pad. The
    Falcon of transformers 5.17 builds its mask without them too: either way the two outcomes are checked."""
    from surogate.ops.attention import packing_refusal

    model = _compiled(name)
    hf = model.base_model.model
    assert any(note.startswith("attention: transformers' own masks") for note in model.surogate_report.notes)
    if name in ("stablelm", "gpt_neo"):
        assert packing_refusal(hf) is None
    if name in ("bloom", "mpt"):
        assert "built without the row's position_ids" in packing_refusal(hf)
    if packing_refusal(hf) is None:
        packed, alone, crossing = _packed_alone_crossing(model, seed=3)
        assert _max_diff(packed, alone) < 0.03
        assert _max_diff(crossing, alone) > 0.1
    else:
        _, row, positions, labels = _row(torch.Generator().manual_seed(3))
        with pytest.raises(ValueError, match="pad the examples"):
            model(input_ids=row, labels=labels, position_ids=positions)
        assert torch.isfinite(model(input_ids=row, labels=labels).loss)


def test_own_masks_under_an_implementation_that_applies_none_refuse_packing():
    """FlashAttention takes no mask: the examples would reach it only through the layer kwargs, which StableLM's
    layers drop. So a StableLM loaded with it refuses packed rows, and says which implementation would pack."""
    from surogate.ops.attention import own_masks_keep_examples_apart, packing_refusal

    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(tiny_config("stablelm"))
    assert own_masks_keep_examples_apart(model)
    model.config._attn_implementation_internal = "flash_attention_2"
    assert not own_masks_keep_examples_apart(model)
    assert "attn_implementation='sdpa'" in packing_refusal(model)


def test_padding_mask_and_right_padding_without_mask_match_the_unpadded_rows():
    """Left padding needs the mask; right padding is invisible to causal attention, so the trainer
    passes no mask there and keeps the causal kernel (surogate/training/steps.py `to_device`)."""
    model = _compiled("llama")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (1, 9), generator=g)
    base = _token_losses(model, input_ids=ids, labels=ids)[0]
    pad = torch.zeros(1, 4, dtype=torch.long)
    left = torch.cat([pad, ids], 1)
    left_labels = torch.cat([pad - 100, ids], 1)
    mask = torch.cat([pad, torch.ones_like(ids)], 1)
    masked = _token_losses(model, input_ids=left, labels=left_labels, attention_mask=mask)[0, 4:]
    unmasked = _token_losses(model, input_ids=left, labels=left_labels)[0, 4:]
    right = torch.cat([ids, pad], 1)
    right_labels = torch.cat([ids, pad - 100], 1)
    assert _max_diff(masked, base) < 0.03
    assert _max_diff(unmasked, base) > 0.1  # without the mask the left padding is attended to
    assert _max_diff(_token_losses(model, input_ids=right, labels=right_labels)[0, :8], base) < 0.03


def test_segment_ids_follow_position_ids_and_padding():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [5, 6, 7, 8, 0, 1, 2, 0, 0]])
    assert segment_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3, 3, 3, 3], [1, 1, 1, 1, 2, 2, 2, 3, 4]]
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert segment_ids(attention_mask=mask).tolist() == [[-1, -1, 0, 0, 0]]
    both = segment_ids(torch.tensor([[0, 1, 0, 1, 2]]), mask)
    assert both.tolist() == [[-1, -1, 2, 2, 2]]
    assert segment_ids() is None


def test_which_architectures_pass_the_layer_kwargs_down_to_attention():
    from surogate.ops.attention import passes_layer_kwargs

    built = {name: T.AutoModelForCausalLM.from_config(tiny_config(name)) for name in ("llama", "gpt2", "stablelm")}
    assert {name: passes_layer_kwargs(m) for name, m in built.items()} == {"llama": True, "gpt2": True,
                                                                            "stablelm": False}


def _bert(is_decoder: bool):
    return T.AutoModelForCausalLM.from_config(T.BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
        max_position_embeddings=64, is_decoder=is_decoder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def test_bidirectional_attention_keeps_its_masks_and_decoders_that_count_positions_refuse_packing():
    """BERT's LM head without `is_decoder` attends both ways: surogate attention (causal) would change what the
    model computes, so it keeps transformers' masks; as a decoder it is causal and takes surogate attention.
    BART's decoder keeps its masks for its (bidirectional) cross-attention, and would refuse packing on its own
    too: it counts its positions itself (no `position_ids` argument), so a packed example would sit at the row's
    positions. (No model that takes surogate attention in transformers 5.25 lacks `position_ids`: that check
    guards the ones to come.)"""
    from surogate.ops.attention import packing_refusal, reads_position_ids, supports

    assert not supports(_bert(is_decoder=False)) and supports(_bert(is_decoder=True))
    assert "keeps transformers' own attention masks" in packing_refusal(_bert(is_decoder=False))
    bart = T.AutoModelForCausalLM.from_config(T.BartConfig(
        d_model=64, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
        decoder_ffn_dim=128, encoder_ffn_dim=128, vocab_size=V, max_position_embeddings=64, dropout=0.0))
    assert not supports(bart) and not reads_position_ids(bart)
    llama = T.AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert reads_position_ids(llama) and packing_refusal(llama) is None and packing_refusal(_bert(True)) is None


def test_sparse_attention_with_an_indexer_keeps_transformers_masks():
    """DeepSeek-V3.2's (and GLM-MoE-DSA's, HY-V4's) indexer picks its top-k keys from transformers' attention mask,
    which is None under surogate attention: HY-V4 failed at the first step (bench/arch_survey.py)."""
    from surogate.ops.attention import supports

    config = T.AutoConfig.for_model("deepseek_v32", num_hidden_layers=2)
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config)
    assert not supports(model)
    with torch.device("meta"):
        assert supports(T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model("deepseek_v3", num_hidden_layers=2)))


def test_packing_is_refused_where_a_mamba_mixer_would_carry_state_across_examples():
    """Falcon-H1 runs a Mamba-2 mixer beside each attention layer: its attention takes the segments, its scan and
    short convolution do not, so a packed example would start from the state of the one before it."""
    from surogate.ops.attention import packing_refusal, supports

    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(T.FalconH1Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=V, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8))
    assert supports(model)
    assert "(FalconH1Mixer: a causal convolution" in packing_refusal(model)


def test_packing_is_refused_where_some_blocks_mix_tokens_without_attention():
    """MiniMax's linear-attention blocks run a lightning attention of its own between its softmax-attention ones:
    no segments reach it, and packed rows were 0.09 nats a token off their examples alone, silently
    (bench/results/arch_survey_cpu.md). A list of blocks that all attend stays accepted."""
    from surogate.ops.attention import packing_refusal, supports

    config = T.AutoConfig.for_model("minimax", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, vocab_size=V, num_local_experts=4,
                                    num_hidden_layers=2, layer_types=["full_attention", "linear_attention"])
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config)
        assert supports(model)
        assert "(MiniMaxLightningAttention: " in packing_refusal(model)
        config.layer_types = ["full_attention", "full_attention"]
        assert packing_refusal(T.AutoModelForCausalLM.from_config(config)) is None


def test_a_layer_that_gets_no_segments_while_they_were_sent_raises(monkeypatch):
    """The run-time guard for an architecture the static check lets through by mistake: StableLM taken as one
    that passes its kwargs on; its attention then gets no segments for a packed row, and says so, instead of
    attending across examples. Plain rows (no segments sent) run."""
    from surogate.ops import attention

    monkeypatch.setattr(attention, "passes_layer_kwargs", lambda model: True)
    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(tiny_config("stablelm")).to(torch.bfloat16)
    model = surogate.compile(_attach_lora(base, {"r": 8, "lora_alpha": 16}), recipe="bf16", arch="cpu")
    assert any(note.startswith("attention: surogate") for note in model.surogate_report.notes)
    _, row, positions, labels = _row(torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="StableLmAttention got no segment ids"):
        model(input_ids=row, labels=labels, position_ids=positions)
    assert torch.isfinite(model(input_ids=row, labels=labels).loss)


def _against_fp32_peft(hf: nn.Module) -> tuple[nn.Module, float, float]:
    """`hf` in bf16 with LoRA, compiled: the compiled model, its loss on a plain batch, and FP32 PEFT's."""
    import copy

    peft = _attach_lora(hf.to(torch.bfloat16), {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    truth = copy.deepcopy(peft).float()
    model = surogate.compile(peft, recipe="bf16", arch="cpu")
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    return model, model(input_ids=ids, labels=ids).loss.item(), truth(input_ids=ids, labels=ids).loss.item()


@pytest.mark.parametrize("name", ["bert", "electra"])
def test_a_head_behind_a_prediction_transform_keeps_hf_s_loss(name):
    """BERT's LM head is `cls.predictions`: dense, activation and LayerNorm, then the decoder linear. The chunked
    loss (`head(backbone(...)[0])`) skipped the transform: 1.8e-3 off FP32 PEFT here, 1.2% in bench/arch_survey.py.
    Electra's head is a direct child, with its transform (`generator_predictions`) beside it: at an embedding size
    equal to the hidden size the chunked loss skipped it silently (at another size the GEMM failed). HF's head
    runs there now."""
    torch.manual_seed(0)
    model, loss, expected = _against_fp32_peft(_bert(is_decoder=True) if name == "bert" else
                                               T.AutoModelForCausalLM.from_config(T.ElectraConfig(
        hidden_size=64, embedding_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=V, max_position_embeddings=64, is_decoder=True, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)))
    assert abs(loss - expected) / expected < 5e-4, (loss, expected)  # measured 4e-5 (before: 1.8e-3)
    assert any("prediction transform" in why for _, why in model.surogate_report.fallbacks)


class _ScaledLogitsHead(nn.Linear):
    """An output embedding as Dory's (transformers 5.25): an nn.Linear subclass whose forward scales each token's
    logit by a learned factor."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = linear.weight
        self.logit_scale = nn.Parameter(torch.linspace(0.5, 3.0, linear.out_features), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states).float() * self.logit_scale.float()


def test_an_output_embedding_with_a_forward_of_its_own_keeps_hf_s_loss():
    """Dory's lm_head scales each token's logit (a learned `logit_scale`, 1 at initialization). The chunked loss
    read only the head's weight: with trained scales the loss was silently another model's (16% off FP32 PEFT on
    Dory with scales of 2, 55% here). HF's head runs there now."""
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(tiny_config("llama"))
    with torch.no_grad():
        hf.lm_head.weight.mul_(50)  # logits of a trained model (~1), not ~0.02, so that the scale shows
    hf.lm_head = _ScaledLogitsHead(hf.lm_head)
    model, loss, expected = _against_fp32_peft(hf)
    assert abs(loss - expected) / expected < 5e-3, (loss, expected)
    assert any("_ScaledLogitsHead" in why for _, why in model.surogate_report.fallbacks)


def _falcon_h1() -> nn.Module:
    config = T.FalconH1Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=V, max_position_embeddings=64,
                              mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
                              mamba_chunk_size=16,
                              lm_head_multiplier=4.0)  # published checkpoints set their own
    return T.AutoModelForCausalLM.from_config(config)


def _recurrent_gemma() -> nn.Module:
    config = T.RecurrentGemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, vocab_size=V, lru_width=64,
                                    attention_window_size=16, block_types=["recurrent", "attention"],
                                    logits_soft_cap=2.0)  # 30 published, against logits of a trained model
    return T.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("build", [_falcon_h1, _recurrent_gemma], ids=["falcon_h1", "recurrent_gemma"])
def test_arithmetic_around_the_head_keeps_hf_s_loss(build):
    """Falcon-H1 multiplies its logits by `lm_head_multiplier`, RecurrentGemma soft-caps them with
    `logits_soft_cap` (Inkling divides its hidden states by a muP multiplier; xLSTM soft-caps too): the chunked
    loss computed `head(backbone(...)[0])` without them, silently another model's loss on a published checkpoint
    (here: Falcon-H1 75% off FP32 PEFT, RecurrentGemma 24 times its loss; a multiplier of 1 and logits far below
    the cap at initialization hid it from the survey's forward). HF's head runs there now."""
    torch.manual_seed(0)
    hf = build()
    with torch.no_grad():
        hf.lm_head.weight.mul_(50)  # logits of a trained model (~1), not ~0.02
    model, loss, expected = _against_fp32_peft(hf)
    assert abs(loss - expected) / expected < 5e-3, (loss, expected)
    assert any("between its backbone, its head and its loss" in why for _, why in model.surogate_report.fallbacks)


class _HeadOnASlice(T.LlamaForCausalLM):
    """The causal LMs of transformers 5.17 (the GPU's; 5.25 slices in a helper first): the hidden states cut to
    `logits_to_keep` inside the head's call, so the subscript's bytecode comes after the head is loaded."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, logits_to_keep=0,
                **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :] * self.config.logits_scaling)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class _MupInTheHeadsCall(_HeadOnASlice):
    def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        hidden_states = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        logits = self.lm_head(hidden_states[:, -logits_to_keep:, :] / self.config.mup_width)  # not a logit scale
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


@pytest.mark.parametrize("scaling", [1.0, 2.0])
def test_a_head_called_on_a_slice_of_the_hidden_states_takes_the_chunked_loss(scaling):
    """Every causal LM of transformers 5.17 calls `self.lm_head(hidden_states[:, slice_indices, :])`: the
    arithmetic check read that slice as an operation on the logits (the head is loaded before its argument) and
    kept HF's head with its full FP32 logits on every model there (the H100 run of 5 Dec: no `lm head:` line).
    The chunked loss runs there now, a logit scale in the call too; arithmetic in the call that is no logit
    scale (a muP divisor) still keeps HF's head."""
    config = tiny_config("llama")
    config.logits_scaling, config.mup_width = scaling, 4.0
    torch.manual_seed(0)
    hf = _HeadOnASlice(config)
    with torch.no_grad():
        hf.lm_head.weight.mul_(50)  # logits of a trained model (~1), not ~0.02, so that a scale shows
    model, loss, expected = _against_fp32_peft(hf)
    assert abs(loss - expected) / expected < 5e-3, (loss, expected)
    assert not [why for what, why in model.surogate_report.fallbacks if what.startswith("lm_head")]
    assert (f"logits x {scaling:g}" in str(model.surogate_report)) == (scaling != 1.0)
    config.logits_scaling = 1.0
    torch.manual_seed(0)
    model, loss, expected = _against_fp32_peft(_MupInTheHeadsCall(config))
    assert abs(loss - expected) / expected < 5e-3, (loss, expected)
    assert any("between its backbone, its head and its loss" in why for _, why in model.surogate_report.fallbacks)


def test_a_model_with_its_own_unshifted_loss_keeps_hf_s_loss():
    """TrOCR's (and CPM-Ant's) forward takes cross-entropy of the logits against the labels unshifted, not through
    transformers' `loss_function`: the chunked loss (which shifts) gave another number, 14% off FP32 PEFT in
    bench/arch_survey.py. HF's loss runs there now."""
    config = T.TrOCRConfig(d_model=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128,
                           vocab_size=V, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                           activation_dropout=0.0)
    torch.manual_seed(0)
    model, loss, expected = _against_fp32_peft(T.AutoModelForCausalLM.from_config(config))
    assert abs(loss - expected) / expected < 5e-3, (loss, expected)
    assert any("computes its own loss" in why for _, why in model.surogate_report.fallbacks)


def test_a_layer_that_builds_its_own_mask_stays_causal_and_inside_its_example():
    """Doge's attention builds its dynamic mask from transformers' causal mask, which is None under surogate: the
    mask it hands on had no causality, and the loss read the future (before: 4.8024 against FP32 PEFT's 4.8247,
    now 4.8244). surogate restricts such a mask to causal pairs within a segment. Checked from first principles
    (no prediction reads a later token) and against FP32 PEFT where transformers' own Doge is causal: 5.17's is
    not (its FP32 loss 4.8023, the non-causal one; 5.25's 4.8247)."""
    import copy

    cfg = T.DogeConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)
    torch.manual_seed(0)
    peft = _attach_lora(T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16),
                        {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    truth = copy.deepcopy(peft).float()
    model = surogate.compile(peft, recipe="bf16", arch="cpu")
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    other = ids.clone()
    other[:, -1] = ids[:, -1] % 90 + 4  # another last token: the predictions before it must not change

    def reads_the_future(m) -> bool:
        with torch.no_grad():
            return not torch.equal(_token_losses(m, input_ids=ids, labels=ids)[:, :-1],
                                   _token_losses(m, input_ids=other, labels=other)[:, :-1])

    assert not reads_the_future(model)
    if not reads_the_future(truth):
        with torch.no_grad():
            assert abs(model(input_ids=ids, labels=ids).loss.item() - truth(input_ids=ids, labels=ids).loss.item()) \
                < 2e-3
    examples, row, positions, labels = _row(torch.Generator().manual_seed(1))
    packed = _token_losses(model, input_ids=row, labels=labels, position_ids=positions)[0]
    alone = torch.cat([torch.cat([torch.zeros(1), _token_losses(model, input_ids=e[None], labels=e[None])[0]])
                       for e in examples])[1:]
    keep = labels[0, 1:] != -100
    assert _max_diff(packed[keep], alone[keep]) < 0.03


def test_calls_without_labels_run_the_original_attention_with_its_masks():
    """Inference and generate() run transformers' own masks (KV cache, padding): a left-padded row's logits
    equal the unpadded row's (RoPE is relative, so the shifted positions do not matter)."""
    model = _compiled("llama")
    hf = model.base_model.model
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(4))
    left = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        padded = model(input_ids=left, attention_mask=mask).logits[0, 2:].float()
        alone = model(input_ids=ids).logits[0].float()
    assert _relative(padded, alone) < 0.02
    assert hf.config._attn_implementation == "surogate"  # switched back after the call


# --- FlexAttention masks: which calls get them, and what they compute -----------------------------------

def test_mask_needs_follow_the_config():
    from surogate.ops.attention import mask_needs

    def needs(name, **overrides):
        config = tiny_config(name)
        for k, v in overrides.items():
            setattr(config, k, v)
        return mask_needs(T.AutoModelForCausalLM.from_config(config))

    assert needs("llama").window_mask(4096) is None
    phi3 = needs("phi3", sliding_window=24)
    assert (phi3.window, phi3.softcap) == (24, False)
    assert phi3.window_mask(25) == 24 and phi3.window_mask(24) is None
    gemma2 = needs("gemma2", sliding_window=24)
    assert (gemma2.window, gemma2.softcap) == (24, True) and gemma2.window_mask(64) is None  # eager path kept
    assert needs("qwen3", sliding_window=24).window is None  # use_sliding_window: false


@pytest.mark.parametrize("window, softcap, packed", [(24, None, False), (24, None, True), (None, None, True),
                                                     (None, 20.0, True)])
def test_flex_masks_compute_what_the_dense_masks_do(monkeypatch, window, softcap, packed):
    """surogate_attention with the BlockMasks `masks_into` builds (FlexAttention, run eagerly here) against the
    dense path the CPU runs; the layer's window and soft-cap come as transformers passes them."""
    import transformers.models.gemma2.modeling_gemma2  # noqa: F401  (the dense path's eager function, run alone too)

    from surogate.ops import attention

    g = torch.Generator().manual_seed(0)
    b, h, hkv, s, d = 2, 4, 2, 40, 16
    q, k, v = (torch.randn(b, n, s, d, generator=g) for n in (h, hkv, hkv))
    # a layer of Gemma 2's modeling file: its eager function (soft-capping and all) is the dense path's original
    module = type("Attention", (torch.nn.Module,), {"__module__": "transformers.models.gemma2.modeling_gemma2"})()
    setattr(module, attention._ORIGINAL_ATTR, "eager" if softcap else "sdpa")
    module.num_key_value_groups = h // hkv
    module.training = False
    positions = torch.cat([torch.arange(15), torch.arange(25)])[None].expand(b, -1) if packed else None
    segments = attention.segment_ids(positions)
    layer = {"sliding_window": window, "softcap": softcap}
    needs = attention.MaskNeeds(window, bool(softcap))
    dense_kwargs, flex_kwargs = {}, {}
    attention.masks_into(dense_kwargs, segments, s, q.device, needs)  # CPU: segments only
    assert attention.BLOCK_MASK_KWARG not in dense_kwargs and attention.WINDOW_MASK_KWARG not in dense_kwargs
    monkeypatch.setattr(attention, "uses_flex", lambda device: True)
    attention.masks_into(flex_kwargs, segments, s, q.device, needs)
    assert (attention.WINDOW_MASK_KWARG in flex_kwargs) == (window is not None)
    assert (attention.BLOCK_MASK_KWARG in flex_kwargs) == packed
    dense, _ = attention.surogate_attention(module, q, k, v, None, scaling=d ** -0.5, **layer, **dense_kwargs)
    flex, _ = attention.surogate_attention(module, q, k, v, None, scaling=d ** -0.5, **layer, **flex_kwargs)
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window, packed", [(24, False), (24, True), (None, True)])
def test_flex_masks_keep_gpt_oss_attention_sinks(monkeypatch, window, packed):
    """GPT-OSS's attention sinks (`s_aux`, one logit per head in every softmax) on the FlexAttention path: its
    windowed layers take it on CUDA at rows longer than the window, as every layer of packed rows does. Without
    them the sliding layers' outputs were off by 21-30% here (the GPU's expert LoRA gradients of layer 0 at
    cosine 0.87-0.90 against FP32 PEFT, tests/gpu/test_moe_gpu.py), while the CPU's dense path kept them."""
    import transformers.models.gpt_oss.modeling_gpt_oss  # noqa: F401  (the dense path's eager function)

    from surogate.ops import attention

    g = torch.Generator().manual_seed(0)
    b, h, hkv, s, d = 2, 4, 2, 40, 16
    q, k, v = (torch.randn(b, n, s, d, generator=g) for n in (h, hkv, hkv))
    module = type("Attention", (torch.nn.Module,), {"__module__": "transformers.models.gpt_oss.modeling_gpt_oss"})()
    setattr(module, attention._ORIGINAL_ATTR, "eager")  # GPT-OSS has no SDPA path
    module.num_key_value_groups = h // hkv
    module.training = False
    module.sinks = torch.randn(h, generator=g)  # the eager function reads the module's, FlexAttention gets s_aux
    positions = torch.cat([torch.arange(15), torch.arange(25)])[None].expand(b, -1) if packed else None
    segments = attention.segment_ids(positions)
    layer = {"sliding_window": window, "s_aux": module.sinks}
    dense_kwargs, flex_kwargs = {}, {}
    attention.masks_into(dense_kwargs, segments, s, q.device, attention.MaskNeeds(window, False))
    monkeypatch.setattr(attention, "uses_flex", lambda device: True)
    attention.masks_into(flex_kwargs, segments, s, q.device, attention.MaskNeeds(window, False))
    assert (attention.WINDOW_MASK_KWARG in flex_kwargs) == (window is not None)
    dense, _ = attention.surogate_attention(module, q, k, v, None, scaling=d ** -0.5, **layer, **dense_kwargs)
    flex_calls, flex = [], attention._flex
    monkeypatch.setattr(attention, "_flex", lambda *args: flex_calls.append(args) or flex(*args))
    flexed, _ = attention.surogate_attention(module, q, k, v, None, scaling=d ** -0.5, **layer, **flex_kwargs)
    assert len(flex_calls) == 1  # the FlexAttention path ran
    torch.testing.assert_close(flexed, dense, rtol=1e-4, atol=1e-5)


def test_which_rows_get_which_masks(monkeypatch):
    from surogate.ops import attention

    monkeypatch.setattr(attention, "uses_flex", lambda device: True)
    cpu = torch.device("cpu")
    plain, longer_window, softcapped, packed = {}, {}, {}, {}
    attention.masks_into(longer_window, None, 64, cpu, attention.MaskNeeds(128, False))
    attention.masks_into(softcapped, None, 64, cpu, attention.MaskNeeds(16, True))
    assert longer_window == {} and softcapped == {}  # SDPA's causal kernel / the eager path
    attention.masks_into(plain, None, 64, cpu, attention.MaskNeeds(16, False))
    assert set(plain) == {attention.WINDOW_MASK_KWARG} and plain[attention.WINDOW_MASK_KWARG][0] == 16
    segments = attention.segment_ids(torch.arange(64)[None])
    attention.masks_into(packed, segments, 64, cpu, attention.MaskNeeds(16, False))
    assert set(packed) == {attention.SEGMENTS_KWARG, attention.BLOCK_MASK_KWARG, attention.WINDOW_MASK_KWARG}
    assert packed[attention.WINDOW_MASK_KWARG][0] == 16  # windowed layers: window and document mask in one
    packed_softcapped = {}
    attention.masks_into(packed_softcapped, segments, 64, cpu, attention.MaskNeeds(16, True))
    assert set(packed_softcapped) == {attention.SEGMENTS_KWARG, attention.BLOCK_MASK_KWARG}  # windowed: dense path
