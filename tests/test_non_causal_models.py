"""Models that are not causal LMs, LoRA-tuned: a head of the user's own on a decoder backbone, bidirectional decoders.

Tiny random configs, CPU, bf16, against eager PEFT.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from peft import LoraConfig, get_peft_model
from test_compile_models import BOUNDS, V, _check_lora_grads, _lora_grads, tiny_config

import surogate
from surogate.compiler import _attach_lora


class _PooledHead(torch.nn.Module):
    """A user's model: LlamaModel, last-token pooling (left padding), a linear head, the loss computed here. Its
    forward names its arguments (no `**kwargs`); `per_token` scores every token instead (token labels, -100
    ignored), `num_labels=1` regresses on float labels."""

    def __init__(self, num_labels: int, per_token: bool = False) -> None:
        super().__init__()
        self.model = T.LlamaModel(tiny_config("llama"))
        self.head = torch.nn.Linear(self.model.config.hidden_size, num_labels)
        self.per_token = per_token

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(hidden if self.per_token else hidden[:, -1]).float()
        if self.head.out_features == 1:
            return {"loss": torch.nn.functional.mse_loss(logits.squeeze(-1), labels), "logits": logits}
        return {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten()), "logits": logits}


@pytest.mark.parametrize("num_labels, per_token", [(1, False), (3, True)])
def test_a_head_of_the_users_own_gets_its_labels_as_given(num_labels, per_token):
    """Before, the wrapper read every model's labels as next tokens and added `use_cache=False`: a forward without
    that argument failed (TypeError); with `**kwargs`, float labels (regression) were refused as 'not int64 token
    ids' and a left-padded row's first real token lost its label (loss 4% off, LoRA gradients 5%)."""
    torch.manual_seed(0)
    peft = get_peft_model(_PooledHead(num_labels, per_token).to(torch.bfloat16),
                          LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    eager = copy.deepcopy(peft)
    compiled = surogate.compile(peft, recipe="bf16", arch="cpu", dynamic=False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    if per_token:
        labels = torch.randint(0, num_labels, (2, 12), generator=g).masked_fill(mask == 0, -100)
    else:
        labels = torch.tensor([0.5, -1.0])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ref = eager(**batch)["loss"]
    ref.backward()
    loss = compiled(**batch)["loss"]
    loss.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < BOUNDS["bf16"][0] * 10  # float32 loss of bf16 logits
    expected = _lora_grads(eager)
    _check_lora_grads(_lora_grads(compiled), expected, expected, "bf16")


def test_a_decoder_made_bidirectional_keeps_transformers_masks():
    """Gemma's `use_bidirectional_attention` (LLM2Vec-style embedding models) makes the decoder attend both ways:
    surogate attention, causal, is not installed there."""
    from surogate.ops.attention import supports

    config = T.Gemma3TextConfig(**{k: getattr(tiny_config("gemma3"), k) for k in ("hidden_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "vocab_size")}, use_bidirectional_attention=True)
    with torch.device("meta"):
        assert not supports(T.Gemma3TextModel(config))
        assert supports(T.Gemma3TextModel(tiny_config("gemma3")))


def _bart() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, decoder_start_token_id=2)).to(torch.bfloat16)


def _t5() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)).to(torch.bfloat16)


def _whisper() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=V, num_mel_bins=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, d_model=64, max_source_positions=16,
        max_target_positions=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0,
        decoder_start_token_id=1, eos_token_id=2, bos_token_id=1, suppress_tokens=None,
        begin_suppress_tokens=None)).to(torch.bfloat16)


def _lora_modules(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
            and len(m.lora_A)]


@pytest.mark.parametrize("make, stacks", [(_bart, ("model.encoder.layers.1.", "model.decoder.layers.1.")),
                                          (_t5, ("encoder.block.1.", "decoder.block.1.")),
                                          (_whisper, ("model.encoder.layers.1.", "model.decoder.layers.1."))])
def test_default_lora_of_an_encoder_decoder_covers_both_stacks(make, stacks):
    """Before, the default LoRA excluded what lay outside the longest list of blocks: BART's and Whisper's whole
    decoder, T5's encoder and every decoder block but the first (its longest list, in a tiny model, is a block's
    three layers). Both stacks now get LoRA on every block, and BART trains as eager PEFT does."""
    options = {"r": 8, "lora_alpha": 16, "init_lora_weights": False}
    peft = _attach_lora(make(), options)
    names = _lora_modules(peft)
    assert all(any(stack in name for name in names) for stack in stacks), names
    if make is not _bart:
        return
    eager = copy.deepcopy(peft)
    compiled = surogate.compile(peft, recipe="bf16", arch="cpu", dynamic=False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, V, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[1, -4:], mask[1, -4:] = 1, 0
    labels = torch.randint(5, V, (2, 8), generator=g)
    labels[1, -3:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ref = eager(**batch).loss
    ref.backward()
    loss = compiled(**batch).loss
    loss.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < BOUNDS["bf16"][0]
    expected = _lora_grads(eager)
    _check_lora_grads(_lora_grads(compiled), expected, expected, "bf16")


@pytest.mark.parametrize("make, task", [
    (lambda: T.BertForMaskedLM(T.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=128, max_position_embeddings=64)), None),
    (lambda: T.Qwen3Model(tiny_config("qwen3")), None),
    (_whisper, None),
    (_t5, "SEQ_2_SEQ_LM"),
])
def test_compile_attaches_lora_with_a_task_peft_can_run(make, task):
    """LoRA attached by `compile` (no PeftModel given) to a model that is not a causal LM: a masked LM or a headless
    backbone failed in PEFT as CAUSAL_LM (no `prepare_inputs_for_generation`), Whisper in its forward (`input_ids`
    given twice); they take PEFT's plain PeftModel, T5 and BART PEFT's seq2seq task."""
    torch.manual_seed(0)
    model = surogate.compile(make().to(torch.bfloat16), recipe="bf16", arch="cpu", dynamic=False,
                             lora={"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    assert model.peft_config["default"].task_type == task
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, V, (2, 8), generator=g)
    if isinstance(model.get_base_model(), T.WhisperForConditionalGeneration):
        out = model(input_features=torch.randn(2, 16, 32, generator=g).to(torch.bfloat16), labels=ids)
    elif isinstance(model.get_base_model(), T.Qwen3Model):
        out = model(input_ids=ids)
    else:
        out = model(input_ids=ids, labels=ids)
    (out.loss if out.get("loss") is not None else out.last_hidden_state.float().square().mean()).backward()
    assert _lora_grads(model) and all(g.abs().sum() > 0 for g in _lora_grads(model).values())
