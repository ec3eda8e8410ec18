"""Quickstart: LoRA on a tiny Qwen3 (random weights) over the bundled GSM8K sample, in a plain PyTorch loop.

No download: the tokenizer is trained locally on first use. Runs on CPU (reference path) or a GPU.
"""
import torch
from transformers import AutoModelForCausalLM

import surogate
from surogate.training.data import build_split
from surogate.training.setup import embedded_model_config
from surogate.training.tokenizer import load_tokenizer

tokenizer = load_tokenizer()  # the embedded default: a byte-level BPE, cached after the first run
device = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModelForCausalLM.from_config(embedded_model_config(tokenizer), dtype=torch.bfloat16).to(device)
model = surogate.compile(model, recipe="bf16", lora={"r": 16, "lora_alpha": 32})
data = build_split(None, "train", "gsm8k", tokenizer, seq_len=128)  # packed into 128-token rows
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
for step, batch in zip(range(10), data.batches(4, shuffle=True, drop_last=True)):
    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}  loss {loss.item():.3f}")
surogate.save_adapter(model, "quickstart-adapter")  # adapter_model.safetensors + adapter_config.json (PEFT)
