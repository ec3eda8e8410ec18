"""Every causal-LM architecture transformers ships, as a new user would bring it: compile, packing, causality.

    python bench/arch_survey.py                  # CPU, every type (about 40 min on 2 cores)
    python bench/arch_survey.py llama doge ...   # some

For each model type in transformers' causal-LM mapping (text models; a vision-language type is skipped), a tiny
config (hidden 64, 2 layers, where the config has those fields), `surogate.compile(recipe="bf16", arch="cpu")` with
the default LoRA targets, then:
- loss: a plain batch's loss against FP32 PEFT eager (the reference; transformers' own bf16 eager error beside it,
  the scale of rounding on the model: CPM-Ant's loss of ~24 nats is 0.8% off in bf16); surogate's masks must keep the model's
  causality (Doge's self-built mask lost it: tests/test_packing.py);
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
PACKED_BOUND, LOSS_BOUND = 0.03, 0.01  # nats per token (bf16 rounding: ~0.003); relative loss (bf16: ~1e-4)


def survey_one(model_type: str) -> dict:
    """One type: compile, plain loss against FP32 PEFT, packed row against its examples alone."""
    import torch
    import transformers as T
    from test_packing import _max_diff, _row, _token_losses

    import surogate
    from surogate.compiler import _attach_lora

    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    try:
        base_config = T.AutoConfig.for_model(model_type)
        if base_config.get_text_config() is not base_config:
            return {"outcome": "skipped", "why": "vision-language type"}
        config = T.AutoConfig.for_model(model_type, **{k: v for k, v in TINY.items() if hasattr(base_config, k)})
        for name, value in vars(config).items():  # every dropout off (Seed-OSS's residual_dropout is 0.1): the
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):  # comparisons need one answer
                setattr(config, name, 0.0)
        torch.manual_seed(0)
        base = T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        with torch.no_grad():
            base(input_ids=ids, labels=ids)
    except Exception as e:  # noqa: BLE001 - the survey's config, not surogate: recorded as such
        return {"outcome": "skipped", "why": f"transformers rejects the tiny config in bf16 ({type(e).__name__})"}
    peft = _attach_lora(base, {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    truth = copy.deepcopy(peft).float()
    with torch.no_grad():  # transformers' own bf16 error: the scale of rounding on this model
        hf_bf16 = copy.deepcopy(peft)(input_ids=ids, labels=ids).loss.item()
    try:
        model = surogate.compile(peft, recipe="bf16", arch="cpu")
        loss = model(input_ids=ids, labels=ids).loss.item()
    except Exception as e:  # noqa: BLE001 - what a user would meet, recorded
        return {"outcome": "compile or first step fails", "why": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    reference = truth(input_ids=ids, labels=ids).loss.item()
    report = model.surogate_report
    row = {"attention": next((n.split(" (")[0].removeprefix("attention: ") for n in report.notes
                              if n.startswith("attention:")), "?"),
           "rewritten": len(report.rewritten), "loss_rel": round(abs(loss - reference) / abs(reference), 5),
           "hf_bf16_rel": round(abs(hf_bf16 - reference) / abs(reference), 5)}
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
    wrong = row["loss_rel"] > max(LOSS_BOUND, 2 * row["hf_bf16_rel"]) or row.get("packed_vs_alone", 0.0) > PACKED_BOUND
    row["outcome"] = "WRONG" if wrong else "ok"
    return row


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
             f"{LOSS_BOUND:.0%} of FP32 PEFT (or twice transformers' own bf16 error, where larger). `python bench/arch_survey.py` (bench/arch_survey.py says what runs).", "",
             "| model type | outcome | attention | linears rewritten | loss vs FP32 PEFT | HF bf16 vs FP32 PEFT | "
             "packed vs alone | crossing vs alone | packing refused / why |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['outcome']} | {row.get('attention', '')} | {row.get('rewritten', '')} | "
                     f"{row.get('loss_rel', '')} | {row.get('hf_bf16_rel', '')} | {row.get('packed_vs_alone', '')} | "
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
