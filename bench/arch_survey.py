"""Every causal-LM architecture transformers ships, as a new user would bring it: compile, packing, causality.

    python bench/arch_survey.py                  # CPU, every type (about an hour on 2 cores)
    python bench/arch_survey.py llama doge ...   # some

For each model type in transformers' causal-LM mapping (text models; a vision-language type is skipped), a tiny
config (hidden 64, 2 layers, where the config has those fields; OVERRIDES where an architecture needs more),
`surogate.compile(recipe="bf16", arch="cpu")` with the default LoRA targets, then:
- loss and gradients: a plain batch's loss, and the LoRA gradients of its backward, against FP32 PEFT eager (the
  reference; transformers' own bf16 eager errors beside them, the scale of rounding on the model: CPM-Ant's loss
  of ~24 nats is 0.8% off in bf16, its LoRA gradients 45%); surogate's masks must keep the model's causality
  (Doge's self-built mask lost it: tests/test_packing.py);
- packing: a row of three examples (positions restarting) against each example alone, per token, or the reason
  surogate refuses packed rows on the model; `crossing` is the same row without position_ids (one long
  sequence), which shows how far the check could see an example attending to another.
Each type runs in its own process (a crash or a hang costs only that type). A type whose tiny config
transformers itself rejects (building it, or its own eager bf16 forward with labels) is listed as skipped: the
survey's config, not surogate, is at fault there.
Writes bench/results/arch_survey_cpu.{json,md} with the versions and commit.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=128, max_position_embeddings=64, num_experts=4, num_local_experts=4,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_embd=64, n_layer=2, n_head=4,
            n_positions=64, ffn_dim=128, d_model=64, num_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            sliding_window=16, hidden_dropout=0.0, attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, dropout=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# Per type, merged over TINY (None drops a TINY key), where TINY alone makes no valid model (transformers rejects it):
MLA = {"num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
       "v_head_dim": 16, "head_dim": 8}  # latent attention: a key/value head per query head; head_dim: the rotary part
INDEXER = {"index_head_dim": 16, "index_n_heads": 2, "index_topk": 8}  # DeepSeek sparse attention's token selector
LINEAR = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
          "linear_value_head_dim": 16}
MAMBA = {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16,
         "mamba_chunk_size": 16}  # heads * head = expand (2) * hidden
DECODER = {"decoder_layers": 2, "decoder_attention_heads": 4, "decoder_ffn_dim": 128}  # num_hidden_layers is the
# encoder's (and sizes the cache), so the decoder's 12 layers overran it
HYBRID = ["linear_attention", "full_attention"]  # one of each: with no attention layer the cache has no mask size
GEMMA4 = {"head_dim": 16, "global_head_dim": 32, "layer_types": ["sliding_attention", "full_attention"],
          "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 128}  # head_dim is per layer
BLT_PART = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "num_hidden_layers": 2}  # each of BLT's four transformers (patcher, byte encoder and decoder, global)
OVERRIDES: dict[str, dict] = {
    "axk1": {**MLA, "n_group": 1, "topk_group": 1},  # one expert group of the 4 experts
    "axk2": {**MLA, **INDEXER},
    "bailing_hybrid": {**MLA, "layer_types": HYBRID, "mlp_layer_types": ["dense", "sparse"], "linear_head_dim": 16,
                       "linear_num_heads": 4, "num_experts_per_token": 2, "num_expert_group": 1, "topk_group": 1,
                       "first_k_dense_replace": 1, "expert_swiglu_limit_list": [0, 0],
                       "share_expert_swiglu_limit_list": [0, 0]},  # both lists have an entry per layer
    "bamba": {**MAMBA, "attn_layer_indices": [1]},  # Mamba2, then attention
    "blt": {"encoder_hash_byte_group_vocab": 256, "local_attention_window_len": 16,
            "patcher_config": {**BLT_PART, "vocab_size": 128},
            "encoder_config": {**BLT_PART, "num_hidden_layers": 1, "hidden_size_global": 128, "vocab_size": 128},
            "decoder_config": {**BLT_PART, "hidden_size_global": 128, "vocab_size": 128},
            "global_config": {**BLT_PART, "hidden_size": 128, "intermediate_size": 256}},  # its parts keep their
    # published sizes (a 12 GB hash embedding) unless given
    "bart": DECODER,
    "bigbird_pegasus": DECODER,
    "blenderbot": DECODER,
    "blenderbot-small": DECODER,
    "codegen": {"rotary_dim": 8},  # rotary_dim (64) must fit the head (16)
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                                                   "mrope_section": [4, 2, 2]}}},  # none by default
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},  # DbrxAttention reads
             "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},  # rope_theta there and
    # cannot clamp with clip_qkv None
    "deepseek_v2": {**MLA, "first_k_dense_replace": 1},  # a dense layer, then MoE
    "deepseek_v3": {**MLA, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1},
    "deepseek_v32": {**MLA, **INDEXER, "n_group": 1, "topk_group": 1},
    "dots1": {"n_shared_experts": 1},  # None by default, which the shared expert's size multiplies
    "dots3_note_text": {**MLA, **INDEXER, "num_attention_heads": 4, "head_dim": 24, "per_layer_config": {},
                        "layer_types": ["indexed_attention", "sliding_attention"],
                        "mlp_layer_types": ["dense", "sparse"], "shared_experts_intermediate_size": 64},  # its heads
    # are per layer by default; the sliding layers' head is qk_nope + qk_rope
    "falcon": {"head_dim": None},  # a read-only property (hidden / heads)
    "gemma3n_text": {"num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2,
                     "num_kv_shared_layers": 2, "activation_sparsity_pattern": [0.0] * 4, "laurel_rank": 8,
                     "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 128},  # the last 2 layers reuse
    # the keys and values of the first 2 (15 layers of the 2 by default)
    "gemma4_text": GEMMA4,
    "gemma4_unified_text": GEMMA4,
    "glm4_moe_lite": MLA,
    "glm_moe_dsa": {**MLA, **INDEXER},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 16},  # must name each of the 2 layers
    "gptj": {"rotary_dim": 8},  # rotary_dim (64) must fit the head (16)
    "granitemoehybrid": {**MAMBA, "layer_types": ["mamba", "attention"], "shared_intermediate_size": 64},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "mamba_dt_rank": 8},  # Mamba, then attention
    "kimi_linear": {**MLA, "q_lora_rank": None, "layer_types": HYBRID, "mlp_layer_types": ["dense", "sparse"],
                    "linear_head_dim": 16, "linear_num_heads": 4, "num_experts_per_token": 2},
    "kolibri1_1": {"layer_types": ["sliding_attention", "indexed_attention"], "index_layers": [1],
                   "kv_source_layers": [0, 1], "index_num_heads": 2, "index_pool_size": 16, "index_compression": 4,
                   "index_topk": 8, "index_num_local_tokens": 4, "index_num_sink_tokens": 2, "mlp_only_layers": [0],
                   "mlp_only_intermediate_size": 128, "shared_expert_intermediate_size": 64},  # every 5th layer indexed
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},  # None by default
    "longcat_flash": {**MLA, "ffn_hidden_size": 128, "expert_ffn_hidden_size": 64, "moe_topk": 2,
                      "zero_expert_num": 2},
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},  # heads * head_dim = expand (2) * hidden
    "marian": DECODER,
    "mbart": DECODER,
    "minicpm3": MLA,
    "mvp": DECODER,
    "pegasus": DECODER,
    "plbart": DECODER,
    "prophetnet": {"num_hidden_layers": None, "num_encoder_layers": 2, "num_decoder_layers": 2,
                   "num_decoder_attention_heads": 4, "decoder_ffn_dim": 128},  # refuses num_hidden_layers
    "qwen3_5_moe_text": {**LINEAR, "layer_types": HYBRID, "shared_expert_intermediate_size": 64},
    "qwen3_5_text": {**LINEAR, "layer_types": HYBRID},
    "qwen3_next": {**LINEAR, "layer_types": HYBRID, "shared_expert_intermediate_size": 64},
    "qwen4_exp_text": {**LINEAR, "layer_types": HYBRID, "shared_expert_intermediate_size": 64, "hc_lowrank": 8,
                       "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 4, "split_ngram_parts": 4, "ngram_vocab_size_base": 128},  # the
    # indexer has no sizes by default
    "recurrent_gemma": {"lru_width": 64, "attention_window_size": 16, "block_types": ["recurrent", "attention"]},
    "reformer": {"is_decoder": True, "axial_pos_embds": False, "attn_layers": ["local", "lsh"],
                 "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4, "attention_head_size": 16,
                 "feed_forward_size": 128},  # axial positions in training need the length to be exactly their product
    "sarvam_mla": MLA,
    "whisper": DECODER,
    "xlnet": {"max_position_embeddings": None, "d_inner": 128},  # refuses a length limit
    "xlstm": {"qk_dim_factor": 1.0},  # hidden * 0.5 is rounded up to 64 in some places, not in others
    "xmod": {"default_language": "en_XX"},  # its adapters need a language
    "youtu": MLA,
    "zamba": {"num_hidden_layers": 4, "layers_block_type": ["linear_attention", "hybrid"] * 2,
              "mamba_dt_rank": 8},  # its shared attention block is tied across hybrid layers: it needs two
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid"], "n_mamba_heads": 8, "mamba_d_state": 16,
               "chunk_size": 16},
    "zaya": {"num_experts_per_tok": 1},  # the only value it supports
}
PACKED_BOUND, LOSS_BOUND = 0.03, 0.01  # nats per token (bf16 rounding: ~0.003); relative loss (bf16: ~1e-4)
GRAD_BOUND = 0.05  # relative L2 error of the LoRA gradients (bf16 activations and weights: ~1e-2)


def survey_one(model_type: str) -> dict:
    """One type: compile, plain loss against FP32 PEFT, packed row against its examples alone."""
    import torch
    import transformers as T
    from test_more_archs import sharpen_routers
    from test_packing import _max_diff, _row, _token_losses

    import surogate
    from surogate.compiler import _attach_lora

    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    try:
        base_config = T.AutoConfig.for_model(model_type)
        if base_config.get_text_config() is not base_config:
            return {"outcome": "skipped", "why": "vision-language type"}
        override = OVERRIDES.get(model_type, {})  # its keys need no `hasattr`: Gemma 4's head_dim raises there
        config = T.AutoConfig.for_model(model_type, **{k: v for k, v in {**TINY, **override}.items()
                                                       if v is not None and (k in override or hasattr(base_config, k))})
        for name, value in vars(config).items():  # every dropout off (Seed-OSS's residual_dropout is 0.1): the
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):  # comparisons need one answer
                setattr(config, name, 0.0)
        if hasattr(config, "use_cache"):  # as training runs (and surogate sets it): Dory's looped layers read a
            config.use_cache = False  # cache across loops (LoRA gradients 9% apart); BLT's cache fails its forward
        torch.manual_seed(0)
        base = T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        sharpen_routers(base)  # MoE: FP32 and bf16 pick the same experts (a flipped near-tie moves their gradients)
        with torch.no_grad():
            base(input_ids=ids, labels=ids)
    except Exception as e:  # noqa: BLE001 - the survey's config, not surogate: recorded as such
        return {"outcome": "skipped", "why": f"transformers rejects the tiny config in bf16 ({type(e).__name__})"}
    try:  # surogate's default targets: PEFT may refuse them
        peft = _attach_lora(base, {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    except Exception as e:  # noqa: BLE001
        return _fails(e)
    truth = copy.deepcopy(peft).float()
    hf = copy.deepcopy(peft)  # transformers' own bf16 error: the scale of rounding on this model
    try:
        hf_out = hf(input_ids=ids, labels=ids)
        hf_out.loss.backward()
        hf_bf16 = hf_out.loss.item()
    except Exception as e:  # noqa: BLE001 - PEFT on transformers' model, without surogate: not surogate's to fix
        return {"outcome": "skipped", "why": f"PEFT's own bf16 training step fails ({type(e).__name__}: "
                f"{str(e)[:80]})"}
    try:
        model = surogate.compile(peft, recipe="bf16", arch="cpu")
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        loss = out.loss.item()
    except Exception as e:  # noqa: BLE001 - what a user would meet
        return _fails(e)
    truth_out = truth(input_ids=ids, labels=ids)
    truth_out.loss.backward()
    reference = truth_out.loss.item()
    report = model.surogate_report
    row = {"attention": next((n.split(" (")[0].removeprefix("attention: ") for n in report.notes
                              if n.startswith("attention:")), "?"),
           "rewritten": len(report.rewritten), "loss_rel": round(abs(loss - reference) / abs(reference), 5),
           "hf_bf16_rel": round(abs(hf_bf16 - reference) / abs(reference), 5),
           "grad_rel": _grad_error(model, truth), "hf_bf16_grad_rel": _grad_error(hf, truth)}
    examples, packed_row, positions, labels = _row(torch.Generator().manual_seed(1))
    keep = labels[0, 1:] != -100
    try:
        packed = _token_losses(model, input_ids=packed_row, labels=labels, position_ids=positions)[0]
    except ValueError as e:
        row["packing"] = "refused: " + str(e).split(" ", 1)[1].split(";")[0]
    except Exception as e:  # noqa: BLE001 - the per-token helper reads `base_model`'s output; some heads differ
        row["packing"] = f"not measured ({type(e).__name__} in the survey's per-token loss)"
    else:
        alone = torch.cat([torch.cat([torch.zeros(1), _token_losses(model, input_ids=e[None], labels=e[None])[0]])
                           for e in examples])[1:]
        crossing = _token_losses(model, input_ids=packed_row, labels=labels)[0]
        row["packed_vs_alone"] = round(_max_diff(packed[keep], alone[keep]), 4)
        row["crossing_vs_alone"] = round(_max_diff(crossing[keep], alone[keep]), 4)
    wrong = (row["loss_rel"] > max(LOSS_BOUND, 2 * row["hf_bf16_rel"])
             or row["grad_rel"] > max(GRAD_BOUND, 2 * row["hf_bf16_grad_rel"])
             or row.get("packed_vs_alone", 0.0) > PACKED_BOUND)
    row["outcome"] = "WRONG" if wrong else "ok"
    return row


def _fails(e: Exception) -> dict:
    """A failure a user would meet, on one line (a module's repr, in PEFT's refusals, cut out)."""
    why = " ".join(re.sub(r"\(\n.*\n\)", "(...)", str(e), flags=re.DOTALL).split())[:200]
    return {"outcome": "compile or first step fails", "why": f"{type(e).__name__}: {why}"}


def _grad_error(model, truth) -> float:
    """The LoRA gradients of the first step against FP32 PEFT's: ||g - g_ref|| / ||g_ref|| over every LoRA
    parameter that gets one in the reference (1.0 where surogate's gets none)."""
    got = dict(model.named_parameters())
    diff = norm = 0.0
    for name, ref in truth.named_parameters():
        if "lora_" not in name or ref.grad is None:
            continue
        grad = got[name].grad
        diff += (ref.grad if grad is None else grad.float() - ref.grad).square().sum().item()
        norm += ref.grad.square().sum().item()
    return round((diff / norm) ** 0.5, 4) if norm else 0.0


def _run_isolated(model_type: str, timeout: float) -> dict:
    """`survey_one` in a child process: its JSON line, or what killed it."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--one", model_type], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"outcome": "compile or first step fails", "why": f"no result in {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    row = json.loads(lines[-1]) if lines else {"outcome": "compile or first step fails",
                                               "why": f"process ended with code {done.returncode}"}
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def markdown(meta: dict, rows: dict[str, dict]) -> str:
    counts: dict[str, int] = {}
    for row in rows.values():
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
    lines = [f"# Architecture survey (CPU, bf16, tiny configs): {', '.join(f'{v} {k}' for k, v in counts.items())}",
             "", f"transformers {meta['transformers']}, peft {meta['peft']}, torch {meta['torch']}, commits "
             f"{', '.join(sorted({row.get('commit', meta['commit']) for row in rows.values()}))} (each row's in the "
             f"JSON). Bounds: packed vs alone <= {PACKED_BOUND} nats a token, loss within "
             f"{LOSS_BOUND:.0%} of FP32 PEFT (or twice transformers' own bf16 error, where larger), LoRA gradients "
             f"within {GRAD_BOUND:.0%} of FP32 PEFT's (relative L2; or twice transformers' bf16 error). "
             "`python bench/arch_survey.py` (bench/arch_survey.py says what runs).", "",
             "| model type | outcome | attention | linears rewritten | loss vs FP32 PEFT | HF bf16 vs FP32 PEFT | "
             "LoRA grads vs FP32 PEFT | HF bf16 grads | packed vs alone | crossing vs alone | packing refused / why |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['outcome']} | {row.get('attention', '')} | {row.get('rewritten', '')} | "
                     f"{row.get('loss_rel', '')} | {row.get('hf_bf16_rel', '')} | {row.get('grad_rel', '')} | "
                     f"{row.get('hf_bf16_grad_rel', '')} | {row.get('packed_vs_alone', '')} | "
                     f"{row.get('crossing_vs_alone', '')} | {row.get('packing', row.get('why', ''))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("types", nargs="*", help="model types (default: every causal-LM type transformers maps)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one type, one JSON line
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per type")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--update", action="store_true",
                   help="re-run the given types into the existing results (each row keeps the commit it ran at)")
    args = p.parse_args(argv)
    import warnings

    from surogate.compat import import_bitsandbytes_offline

    import_bitsandbytes_offline()  # before PEFT imports bitsandbytes: no Hub fetch (surogate/compat.py)

    warnings.filterwarnings("ignore")
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.one:
        print(json.dumps(survey_one(args.one)), flush=True)
        return 0
    import peft
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from surogate.training.info import git_commit

    types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    commit = os.environ.get("GIT_COMMIT") or git_commit()
    previous = args.out / "arch_survey_cpu.json"
    rows = {}
    if args.update and previous.exists():
        before = json.loads(previous.read_text())
        rows = {name: {"commit": before["meta"]["commit"], **row} for name, row in before["types"].items()}
    for i, name in enumerate(types, 1):
        rows[name] = {**_run_isolated(name, args.timeout), "commit": commit}
        print(f"[{i}/{len(types)}] {name}: {json.dumps(rows[name])}", flush=True)
    meta = {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
            "commit": commit}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arch_survey_cpu.json").write_text(json.dumps({"meta": meta, "types": rows}, indent=1))
    md = markdown(meta, rows)
    (args.out / "arch_survey_cpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
