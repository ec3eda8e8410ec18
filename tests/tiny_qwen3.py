"""The tiny random Qwen3 the GPU compile tests share: bf16 on CUDA with PEFT LoRA attached."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 512


def cuda_lora_qwen3(seed: int = 0, layers: int = 2) -> nn.Module:
    """`layers` layers of hidden 256, LoRA r=8 on the 7 projections, B initialised non-zero so that the
    gradients of both LoRA factors (and the LoRA term of the output) are exercised."""
    import transformers as T

    from surogate.compiler import _attach_lora

    torch.manual_seed(seed)
    cfg = T.Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, vocab_size=VOCAB)
    model = T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).cuda()
    return _attach_lora(model, {"r": 8, "lora_alpha": 16, "init_lora_weights": False})


def second_step(model: nn.Module) -> tuple[float, torch.Tensor, list[str]]:
    """(loss, flat LoRA grads, CUDA kernel names of the backward) of `model`'s second step on fixed ids (2 x 128):
    the first compiles (and autotunes), the second's backward runs under the profiler."""
    ids = torch.randint(0, VOCAB, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        loss.backward()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    params = dict(model.named_parameters())
    grads = torch.cat([params[n].grad.flatten().float() for n in sorted(n for n in params if "lora_" in n)])
    return loss.item(), grads, kernels


def train_losses(model: nn.Module, micro_step, steps: list[list[torch.Tensor]]) -> list[float]:
    """Fused AdamW (lr 1e-3) over `model`'s trainable parameters, one optimizer step per list of micro-batch
    ids in `steps`, each micro-batch through `micro_step(ids) -> loss`; the mean loss of every step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    losses = []
    for batches in steps:
        losses.append(torch.stack([micro_step(ids).clone() for ids in batches]).mean().item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def eager_micro_step(model: nn.Module, loss_scale: float):
    """`ids -> loss`: the eager forward and `(loss * loss_scale).backward()`, what GraphedStep replays."""
    def step(ids: torch.Tensor) -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        (loss * loss_scale).backward()
        return loss.detach()

    return step


def assert_same_lora(model: nn.Module, reference: nn.Module, min_cosine: float = 0.9999) -> None:
    """Every trainable (LoRA) parameter of `model` points where `reference`'s does (cosine over the tensor)."""
    ref = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            cos = torch.nn.functional.cosine_similarity(p.flatten().float(), ref[n].flatten().float(), dim=0)
            assert cos > min_cosine, (n, cos.item())


def cpu_lora_qwen3() -> nn.Module:
    """2 layers of hidden 64 in bf16 on the CPU, LoRA r=8 on the 7 projections with B non-zero: the compiled
    model the producer and grad-producer CPU tests compare with an option on and off."""
    import transformers as T

    from surogate.compiler import _attach_lora

    torch.manual_seed(0)
    cfg = T.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64)
    return _attach_lora(T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16),
                        {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
