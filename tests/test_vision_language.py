"""Vision-language models fine-tuned with LoRA: tiny random configs, CPU, against eager PEFT.

The text decoder takes surogate attention; the vision tower keeps its own (bidirectional, no segments), its LoRA
trained where the targets reach it ("all-linear").
"""

from __future__ import annotations

import copy

import torch
import transformers as T
from test_compile_models import BOUNDS, _check_lora_grads, _lora_grads

import surogate
from surogate.compiler import _attach_lora
from surogate.ops.attention import segment_ids

V, IMAGE, START, END = 256, 250, 248, 249


def _qwen2_vl(attn: str, vision_blocks: int = 1) -> torch.nn.Module:
    """Qwen2-VL, 2 text layers of hidden 64 (M-RoPE sections 2/3/3 of head dim 16), vision blocks of 32."""
    text = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                        "rope_theta": 10000.0})
    vision = dict(depth=vision_blocks, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2)
    config = T.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=251,
                             vision_start_token_id=START, vision_end_token_id=END)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return T.Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)


def _image_batch(padded: bool) -> dict:
    """Two rows of 24 tokens, each with one 4x4-patch image (4 tokens after the 2x2 merge); the second row's last
    5 tokens padding when `padded`."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 240, (2, 24), generator=g)
    ids[:, 3], ids[:, 4:8], ids[:, 8] = START, IMAGE, END
    labels = ids.masked_fill(ids == IMAGE, -100)
    batch = {"input_ids": ids, "labels": labels, "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]]),
             "pixel_values": torch.randn(32, 3 * 2 * 4 * 4, generator=g).to(torch.bfloat16),
             "mm_token_type_ids": (ids == IMAGE).long()}
    if padded:
        mask = torch.ones_like(ids)
        mask[1, -5:] = 0
        labels[1, -5:] = -100
        batch["attention_mask"] = mask
    return batch


def _follows_eager_peft(peft: torch.nn.Module, batch: dict, part: str | None = None):
    """(compiled, eager copy, compiled loss): `peft` compiled (bf16) against its eager copy on `batch`: the loss and
    the LoRA gradients within bf16 rounding, and LoRA gradients reaching a module named with `part`."""
    eager = copy.deepcopy(peft)
    compiled = surogate.compile(peft, recipe="bf16", arch="cpu", dynamic=False)
    ref = eager(**batch).loss
    ref.backward()
    loss = compiled(**batch).loss
    loss.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < BOUNDS["bf16"][0]
    grads, expected = _lora_grads(compiled), _lora_grads(eager)
    assert part is None or any(part in name for name in grads)
    _check_lora_grads(grads, expected, expected, "bf16")
    return compiled, eager, loss


def test_vision_tower_keeps_its_bidirectional_attention():
    """An eager Qwen2-VL with LoRA on every linear ("all-linear": the vision tower's too): the vision tower's
    attention stays bidirectional and its LoRA gradients follow eager PEFT, on plain and padded batches. Before,
    compile switched the vision config to surogate attention too: its eager path made the tower causal (vision
    LoRA gradients at cosine 0.36 against PEFT), and a padded batch's text segments reached the tower's layers
    (a shape error, or 'SiglipAttention got no segment ids' on Gemma 3)."""
    for padded in (False, True):
        peft = _attach_lora(_qwen2_vl("eager"), {"r": 8, "lora_alpha": 16, "init_lora_weights": False,
                                                 "target_modules": "all-linear"})
        compiled, _, _ = _follows_eager_peft(peft, _image_batch(padded), ".visual.")
        assert compiled.base_model.model.config.vision_config._attn_implementation == "eager"


def test_mrope_position_ids_mark_examples_only_with_a_text_row():
    """3-D M-RoPE positions: (3, B, S) mark no examples (an image's tokens do not count up by one; transformers
    reads none either); (4, B, S) lead with the text positions, transformers' packing convention. Before, both
    were flattened into one (1, 3 B S) row of segments, and compile failed on a shape error."""
    rows = torch.arange(6).expand(2, -1)
    mrope = torch.stack([rows, rows // 2, rows % 2])  # an image's height and width positions
    assert segment_ids(mrope) is None
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    assert torch.equal(segment_ids(mrope, mask), segment_ids(None, mask))
    packed = torch.tensor([0, 1, 2, 0, 1, 2]).expand(2, -1)
    assert torch.equal(segment_ids(torch.stack([packed, *mrope])), segment_ids(packed))


def _gemma3() -> torch.nn.Module:
    """Gemma 3 with a SigLIP tower of 16 patches, 16 image tokens; the projector's weight random (it starts at zero:
    every image token the same) and the text q/k scaled up, so that the image tokens' attention matters."""
    text = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16, image_token_id=IMAGE,
                            boi_token_id=START, eoi_token_id=END)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = T.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
        for name, p in model.model.language_model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(4)
    return model.to(torch.bfloat16)


def test_gemma3_image_tokens_attend_both_ways():
    """Gemma 3's image tokens (`token_type_ids` 1) attend to each other both ways in transformers' masks; calls
    that pass token types run those masks, and the loss and LoRA gradients follow eager PEFT. Before, surogate's
    causal segments replaced them silently: the loss 0.7% off, LoRA gradients at cosine 0.39."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 240, (2, 28), generator=g)
    ids[:, 1], ids[:, 2:18], ids[:, 18] = START, IMAGE, END
    batch = {"input_ids": ids, "labels": ids.clone(), "token_type_ids": (ids == IMAGE).long(),
             "pixel_values": (4 * torch.randn(2, 3, 32, 32, generator=g)).to(torch.bfloat16)}
    peft = _attach_lora(_gemma3(), {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    compiled, eager, loss = _follows_eager_peft(peft, batch)
    text_only = {k: v for k, v in batch.items() if k != "token_type_ids"}  # causal, as in transformers
    assert compiled(**text_only).loss.item() != loss.item()
    # TRL's fused head calls the backbone directly: the token types keep their masks there too
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        direct = compiled.get_base_model().model(**inputs).last_hidden_state
        expected = eager.get_base_model().model(**inputs).last_hidden_state
    assert (direct - expected).float().norm() / expected.float().norm() < 0.02


def test_models_whose_token_types_make_blocks_bidirectional_are_recognized():
    """PaliGemma's prefix (image and prompt, `token_type_ids` 0) attends both ways too; GPT-2's token types are
    embeddings only, and a text-only Gemma 3 has none."""
    from surogate.ops.attention import masks_from_token_types

    text = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8, projection_dim=32)
    pali = T.PaliGemmaForConditionalGeneration(T.PaliGemmaConfig(text_config={**text, "model_type": "gemma"},
                                                                  vision_config=vision, projection_dim=32))
    assert masks_from_token_types(pali)
    assert not masks_from_token_types(T.Gemma3ForCausalLM(T.Gemma3TextConfig(**text)))
    assert not masks_from_token_types(T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=V)))


def test_default_targets_are_the_language_models_when_the_vision_tower_is_deeper():
    """Qwen2-VL-7B's vision tower has 32 blocks, its language model 28 (PaliGemma-3B: 27 and 18): the default targets,
    their exclusion and the compiled blocks are the language model's. Before, the longest list of blocks won: LoRA
    went on the vision tower's fc1/fc2 alone (PaliGemma: SigLIP's, the language model excluded), and a text batch's
    loss had no gradient."""
    from surogate.compiler import default_exclude, default_targets

    model = _qwen2_vl("sdpa", vision_blocks=3)
    targets = default_targets(model)
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert default_exclude(model, targets) is None  # the vision tower's linears are qkv, proj, fc1, fc2
    compiled = surogate.compile(model, recipe="bf16", arch="cpu", dynamic=False)
    assert all(".language_model.layers." in n for n, _ in compiled.named_parameters() if "lora_A" in n)
    ids = torch.randint(3, 240, (2, 12), generator=torch.Generator().manual_seed(1))
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert any("Qwen2VLDecoderLayer" in note for note in compiled.surogate_report.notes)


def test_mllama_cross_attention_reads_every_image_token():
    """Llama 3.2 Vision's cross-attention layers attend from the text to the image's tokens with their own mask:
    no causality, no segments. Before, surogate attention made them causal over the image's tokens (a text token at
    position i read image tokens 0..i only): cross-attention LoRA gradients at cosine 0.19 against PEFT once the
    layer's gates are open (they start at zero, which hides it)."""
    text = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, cross_attention_layers=[1], pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=32, patch_size=4, max_num_tiles=1, vision_output_dim=64, intermediate_layers_indices=[0],
                  supported_aspect_ratios=[[1, 1]])
    torch.manual_seed(0)
    model = T.MllamaForConditionalGeneration(T.MllamaConfig(text_config=text, vision_config=vision,
                                                            image_token_index=IMAGE))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.fill_(1.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 240, (2, 24), generator=g)
    ids[:, 1] = IMAGE
    cross = torch.zeros(2, 24, 1, 1, dtype=torch.long)
    cross[:, 1:] = 1
    batch = {"input_ids": ids, "labels": ids.masked_fill(ids == IMAGE, -100), "cross_attention_mask": cross,
             "pixel_values": torch.randn(2, 1, 1, 3, 32, 32, generator=g).to(torch.bfloat16),
             "aspect_ratio_ids": torch.ones(2, 1, dtype=torch.long),
             "aspect_ratio_mask": torch.ones(2, 1, 1, dtype=torch.long)}
    peft = _attach_lora(model.to(torch.bfloat16), {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    _follows_eager_peft(peft, batch, ".cross_attn.")
