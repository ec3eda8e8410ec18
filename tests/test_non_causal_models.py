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
