"""A compiled model under TRL's `SFTTrainer` on a GPU, against the same trainer on eager PEFT, and `surogate train`
on a checkpoint stored in bitsandbytes' 4-bit format: what the CPU tests of tests/test_hf_trainer.py and
test_compile_api.py check, on CUDA (FlexAttention's block masks for packed rows, bitsandbytes' CUDA loader).

    python bench/trainer_check.py [--out bench/results] [--steps 8]     (--steps 0: the bitsandbytes part alone)

SFTTrainer packs (`packing=True`: padding-free rows whose `position_ids` restart) and computes its loss with its
fused LM head, which calls the backbone directly: surogate must keep the packed examples apart there. Needs trl
and datasets (bitsandbytes for the last row); writes trainer_check_<gpu>.json/.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from microbench import command_line, table, varied_chat_rows, write_results  # noqa: E402

RECIPES = ("bf16", "qfp8", "qnf4")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a smoke run of the script itself


def _rows(n: int = 96) -> list[dict]:
    """The varied chat rows as plain text (the bundled tokenizer has no chat template): packed rows hold several."""
    return [{"text": "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"])}
            for row in varied_chat_rows(n)]


def _model(tokenizer):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.Qwen3Config(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=64, vocab_size=len(tokenizer), tie_word_embeddings=True,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def _sft_losses(recipe: str | None, tokenizer, steps: int) -> list[float]:
    """Per-step training losses of SFTTrainer (packed) on a LoRA model: eager PEFT if `recipe` is None."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    import surogate

    model = get_peft_model(_model(tokenizer).to(DEVICE), LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"], lora_dropout=0.0))
    if recipe is not None:
        model = surogate.compile(model, recipe=recipe)
    args = SFTConfig(output_dir=f"/tmp/trainer_check/{recipe}", packing=True, max_length=512,
                     per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-3, logging_steps=1,
                     report_to="none", gradient_checkpointing=False, bf16=DEVICE == "cuda", seed=0, save_strategy="no",
                     dataloader_num_workers=0, disable_tqdm=True, use_cpu=DEVICE == "cpu")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(_rows()),
                         processing_class=tokenizer)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _packed_apart(recipe: str, tokenizer) -> float:
    """Relative distance of the second packed example's hidden states, through the backbone called directly (TRL's
    fused head), from the same example alone: ~bf16 rounding when kept apart, ~1 when it saw the first."""
    from peft import LoraConfig, get_peft_model

    import surogate

    model = surogate.compile(get_peft_model(_model(tokenizer).to(DEVICE), LoraConfig(
        r=16, target_modules=["q_proj", "v_proj", "gate_proj"])), recipe=recipe)
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(1, len(tokenizer), (1, n), generator=g).to(DEVICE) for n in (57, 71))
    positions = torch.cat([torch.arange(57), torch.arange(71)])[None].to(DEVICE)
    backbone = model.get_base_model().model
    with torch.no_grad():
        packed = backbone(input_ids=torch.cat([a, b], 1), position_ids=positions).last_hidden_state[:, 57:]
        alone = backbone(input_ids=b).last_hidden_state
    return float((packed.float() - alone.float()).norm() / alone.float().norm())


def _bnb_checkpoint_trains(tokenizer, out: Path) -> dict:
    """`surogate train` (qnf4) on a checkpoint saved by bitsandbytes in NF4, loaded the way a "-bnb-4bit" upload is."""
    import transformers as T

    bf16, nf4 = out / "bf16", out / "nf4"
    _model(tokenizer).save_pretrained(bf16)
    config = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    T.AutoModelForCausalLM.from_pretrained(bf16, quantization_config=config, dtype=torch.bfloat16,
                                           device_map=DEVICE).save_pretrained(nf4)
    tokenizer.save_pretrained(nf4)
    run = subprocess.run([sys.executable, "-m", "surogate", "train", "--set", f"model={nf4}", "--set", "recipe=qnf4",
                          "--set", "max_steps=4", "--output-dir", str(out / "run")],
                         capture_output=True, text=True, cwd=ROOT, timeout=240)
    text = run.stdout + run.stderr
    return {"rc": run.returncode, "note": "dequantized to bf16 on load" in text,
            "tail": text.strip().splitlines()[-3:]}


def main() -> None:
    args, env = command_line(__doc__, "--steps", type=int, default=8)
    from surogate.training.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    reference = _sft_losses(None, tokenizer, args.steps) if args.steps else []
    rows = []
    for recipe in RECIPES if args.steps else ():
        losses = _sft_losses(recipe, tokenizer, args.steps)
        worst = max(abs(x - y) / abs(y) for x, y in zip(losses, reference))
        rows.append({"recipe": recipe, "first": losses[0], "last": losses[-1], "peft_last": reference[-1],
                     "worst_rel": worst, "apart": _packed_apart(recipe, tokenizer)})
        print(rows[-1], flush=True)
    _write(args, env, rows, reference, None)  # the SFT rows kept if the bitsandbytes run is cut short
    bnb = _bnb_checkpoint_trains(tokenizer, Path("/tmp/trainer_check/bnb"))
    print(bnb, flush=True)
    _write(args, env, rows, reference, bnb)


def _write(args, env: dict, rows: list[dict], reference: list[float], bnb: dict | None) -> None:
    lines = [f"# SFTTrainer (packing=True) on {env['gpu']}: surogate against eager PEFT, {args.steps} steps", "",
             *table([("recipe", "recipe"), ("loss, step 1", lambda r: f"{r['first']:.4f}"),
                     ("last", lambda r: f"{r['last']:.4f}"), ("PEFT's last", lambda r: f"{r['peft_last']:.4f}"),
                     ("worst step, relative", lambda r: f"{r['worst_rel']:.2e}"),
                     ("packed example vs alone", lambda r: f"{r['apart']:.2e}")], rows), "",
             "`surogate train` (qnf4) on a bitsandbytes NF4 checkpoint: " +
             (f"exit {bnb['rc']}, note printed: {bnb['note']}" if bnb else "not run yet")]
    print("\n".join(lines))
    write_results(args.out, "trainer_check", env, {"sft": rows, "peft": reference, "bnb_checkpoint": bnb}, lines)

if __name__ == "__main__":
    main()
