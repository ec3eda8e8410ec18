"""Tiny model folders that ship their own modeling code (`auto_map` in config.json pointing at Python files beside
it), as Hub repos that need `trust_remote_code=True` do (InternLM2, MiniCPM, Baichuan, Qwen-1): written offline,
random weights saved with save_pretrained, and the embedded default tokenizer saved beside them.

Two kinds: "llama" subclasses transformers' Llama classes under names and a model_type of its own (what remote code
copied from transformers looks like: its attention calls ALL_ATTENTION_FUNCTIONS), "plain" is a decoder written
from torch alone (its own SDPA attention, RoPE, norm and loss), which none of surogate's architecture checks know."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LLAMA_CONFIGURATION = '''
from transformers import LlamaConfig


class TinyRemoteLlamaConfig(LlamaConfig):
    model_type = "tiny_remote_llama"
'''

LLAMA_MODELING = '''
from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteLlamaConfig


class TinyRemoteLlamaForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteLlamaConfig
'''

PLAIN_CONFIGURATION = '''
from transformers import PretrainedConfig


class TinyPlainConfig(PretrainedConfig):
    model_type = "tiny_plain"

    def __init__(self, vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0, rms_norm_eps=1e-6,
                 initializer_range=0.1, max_position_embeddings=256, tie_word_embeddings=False, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.rope_theta, self.rms_norm_eps = num_key_value_heads, rope_theta, rms_norm_eps
        self.initializer_range, self.max_position_embeddings = initializer_range, max_position_embeddings
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
'''

PLAIN_MODELING = '''
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from .configuration_tiny_remote import TinyPlainConfig


class TinyPlainNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype) * self.weight


def _rope(x, positions, theta):
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions[:, None, :, None].float() * freqs
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class TinyPlainSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.theta = config.hidden_size // self.heads, config.rope_theta
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, positions):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rope(q, positions, self.theta), _rope(k, positions, self.theta)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class TinyPlainFeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyPlainBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = TinyPlainNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = TinyPlainSelfAttention(config)
        self.ffn_norm = TinyPlainNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = TinyPlainFeedForward(config)

    def forward(self, x, positions):
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.ffn(self.ffn_norm(x))


class TinyPlainPreTrainedModel(PreTrainedModel):
    config_class = TinyPlainConfig
    base_model_prefix = "model"

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, TinyPlainNorm):
            nn.init.ones_(module.weight)


class TinyPlainModel(TinyPlainPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TinyPlainBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = TinyPlainNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        for layer in self.layers:
            x = layer(x, position_ids)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class TinyPlainForCausalLM(TinyPlainPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = TinyPlainModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):
        hidden = self.model(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
        logits = self.lm_head(hidden.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
'''

KINDS = {
    "llama": (LLAMA_CONFIGURATION, LLAMA_MODELING, "TinyRemoteLlamaConfig", "TinyRemoteLlamaForCausalLM"),
    "plain": (PLAIN_CONFIGURATION, PLAIN_MODELING, "TinyPlainConfig", "TinyPlainForCausalLM"),
}


def save_remote_code_model(path: Path, kind: str = "plain", seed: int = 0, **shape) -> Path:
    """A 1-layer, hidden-32 causal LM of `kind` (module doc) in bf16 with the default tokenizer, saved to `path`;
    loading it needs `trust_remote_code=True`. `shape` overrides config values (e.g. initializer_range)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from surogate.training.tokenizer import DEFAULT_VOCAB_SIZE, default_tokenizer

    configuration, modeling, config_class, model_class = KINDS[kind]
    path.mkdir(parents=True, exist_ok=True)
    (path / "configuration_tiny_remote.py").write_text(configuration)
    (path / "modeling_tiny_remote.py").write_text(modeling)
    values = {"vocab_size": DEFAULT_VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256,
              "initializer_range": 0.1, **shape}
    model_type = {"llama": "tiny_remote_llama", "plain": "tiny_plain"}[kind]
    (path / "config.json").write_text(json.dumps({
        "model_type": model_type, "architectures": [model_class],
        "auto_map": {"AutoConfig": f"configuration_tiny_remote.{config_class}",
                     "AutoModelForCausalLM": f"modeling_tiny_remote.{model_class}"}, **values}))
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, dtype=torch.bfloat16)
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
        default_tokenizer().save_pretrained(path)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
    return path


TOKENIZATION = '''
from transformers import PreTrainedTokenizerFast


class TinyRemoteTokenizer(PreTrainedTokenizerFast):
    pass
'''


def save_remote_code_tokenizer(path: Path) -> Path:
    """The embedded default tokenizer saved to `path` as a class of the folder's own code (tokenizer_config.json's
    auto_map), as Qwen-1's and ChatGLM's are; loading it needs `trust_remote_code=True`."""
    from surogate.training.tokenizer import default_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    default_tokenizer().save_pretrained(path)
    (path / "tokenization_tiny_remote.py").write_text(TOKENIZATION)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="TinyRemoteTokenizer",
                  auto_map={"AutoTokenizer": [None, "tokenization_tiny_remote.TinyRemoteTokenizer"]})
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path
