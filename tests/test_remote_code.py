"""Models that ship their own modeling code (`trust_remote_code`), from tests/remote_code_models.py: a Llama
subclass under names of its own, and a plain decoder written from torch alone.

Before the key, `surogate train` on such a folder asked transformers' terminal prompt ("Do you wish to run the custom
code? [y/N]") and, answered with no input, failed with "model: .../config.json is not a config transformers reads
(The repository ... contains custom code ...)"; `trust_remote_code: true` was an unknown key. Now the folder is
refused in one line naming the key, and with it the run trains and its adapter loads in PEFT on the same model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from remote_code_models import save_remote_code_model, save_remote_code_tokenizer
from test_compile_models import BOUNDS, _flat, _lora_grads, _rel, _same_operands, assert_every_target_rewritten
from tiny_models import save_tiny_model, tiny_raw_config, write_config
from transformers import AutoModelForCausalLM

import surogate
from surogate.compiler import _attach_lora
from surogate.training import setup, steps
from surogate.training.cli import main
from surogate.training.config import from_dict
from surogate.training.data import load_splits
from surogate.training.train import train

CPU = torch.device("cpu")
SAME_TOL = 2e-3  # eval loss, relative, of the saved adapter in eager PEFT against the run's (as test_start_adapter)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SUROGATE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "surogate-cache"))


@pytest.fixture(scope="module", params=["llama", "plain"])
def remote_dir(request, tmp_path_factory):
    return request.param, save_remote_code_model(tmp_path_factory.mktemp(f"remote-{request.param}"), request.param,
                                                 initializer_range=0.5)


@pytest.fixture(scope="module", params=["llama", "plain"])
def compile_dir(request, tmp_path_factory):
    """At the default initializer_range 0.1: at 0.5 (logits ~10x) bf16 rounding alone moves the loss 1e-3."""
    return request.param, save_remote_code_model(tmp_path_factory.mktemp(f"compile-{request.param}"), request.param)


def _quiet(line: str) -> None:
    pass


def _load(folder, dtype=torch.bfloat16):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype)


def test_without_the_key_the_folder_is_refused_in_one_line(remote_dir, tmp_path, capsys):
    _, folder = remote_dir
    assert main(["train", write_config(tmp_path / "run.yaml", tiny_raw_config(folder, tmp_path / "out"))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "[y/N]" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"surogate: error: model: {folder} ships its own modeling code (configuration_tiny_remote.py,"
                          " modeling_tiny_remote.py, named by auto_map in its config.json); set trust_remote_code: "
                          "true to load it"), err
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_of_its_own_code_is_refused_without_the_key_and_loads_with_it(tmp_path, capsys):
    """`tokenizer:` a folder whose tokenizer_config.json maps AutoTokenizer to its own file (Qwen-1, ChatGLM): one
    line before anything loads (was: transformers' ValueError traceback); with the key, the tokenizer is that class."""
    tokenizer = save_remote_code_tokenizer(tmp_path / "tok")
    raw = tiny_raw_config(save_tiny_model(tmp_path / "model"), tmp_path / "out", tokenizer=str(tokenizer))
    assert main(["train", write_config(tmp_path / "run.yaml", raw)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"surogate: error: tokenizer: {tokenizer} ships its own tokenizer code "
                       "(tokenization_tiny_remote.py, named by auto_map in its tokenizer_config.json); set "
                       "trust_remote_code: true to load it (that runs its Python code on this machine: read it "
                       "first)"), err
    assert not any("Traceback" in line for line in err)
    loaded = setup.load_tokenizer_for(from_dict({**raw, "trust_remote_code": True}), _quiet)
    assert type(loaded).__name__ == "TinyRemoteTokenizer" and len(loaded) == 2048


def test_packing_is_refused_where_the_model_attends_on_its_own(tmp_path, capsys):
    """The plain decoder's attention takes no segments and builds no mask from position_ids: packed examples would
    attend to each other, so packing is refused in one line (the Llama subclass takes surogate attention and packs)."""
    folder = save_remote_code_model(tmp_path / "plain", "plain")
    raw = tiny_raw_config(folder, tmp_path / "out", trust_remote_code=True)
    assert main(["train", write_config(tmp_path / "run.yaml", raw)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("surogate: error: sample_packing: TinyPlainForCausalLM keeps transformers' own attention "
                          "masks"), err
    assert "set sample_packing: false" in err and "Traceback" not in err


def test_the_run_trains_and_peft_reproduces_its_eval_loss(remote_dir, tmp_path, capsys):
    """`trust_remote_code: true`: the run trains (LoRA B leaves zero), and the adapter it saves, loaded by
    PeftModel.from_pretrained onto the model loaded with trust_remote_code=True, gives the run's final eval loss.
    Padded rows: eager PEFT's plain decoder attends across packed examples."""
    kind, folder = remote_dir
    raw = tiny_raw_config(folder, tmp_path / "out", trust_remote_code=True, sample_packing=False,
                          gradient_accumulation_steps=1, eval_steps=None, max_steps=3, learning_rate=0.05)
    cfg = from_dict(raw)
    result = train(cfg, log=_quiet)
    report = (tmp_path / "out" / "compile_report.txt").read_text()
    if kind == "llama":  # its attention calls transformers' registry: surogate's attention and chunked head
        assert "attention: surogate" in report and "lm_head + cross-entropy: surogate::" in report, report
    else:  # its own SDPA and loss: kept, and the report says so
        assert "attention: transformers' own masks" in report and "kept HF's (full logits)" in report, report

    adapter = result.adapter_dir
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder.resolve())
    peft_model = PeftModel.from_pretrained(_load(folder), adapter).eval()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    _, eval_set = load_splits(cfg, setup.load_tokenizer_for(cfg, _quiet), _quiet)
    got = steps.evaluate(peft_model, eval_set, 2, CPU)
    print(f"eval loss: PEFT {got:.6f}, the run {result.final_eval_loss:.6f}")
    assert abs(got - result.final_eval_loss) < SAME_TOL * result.final_eval_loss, (got, result.final_eval_loss)
    with peft_model.disable_adapter():  # the adapter changed the loss: the comparison above can fail
        bare = steps.evaluate(peft_model, eval_set, 2, CPU)
    print(f"eval loss without the adapter {bare:.6f}")
    assert abs(bare - result.final_eval_loss) > 2 * SAME_TOL * result.final_eval_loss, (bare, result.final_eval_loss)

    # `surogate merge` needs the flag as well, and writes the model's code beside the merged weights
    merged = tmp_path / "merged"
    assert main(["merge", str(folder), str(adapter), str(merged)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loads' progress bars above
    assert err.startswith(f"surogate: error: BASE: {folder} ships its own modeling code") and \
        "pass --trust-remote-code" in err, err
    assert main(["merge", str(folder), str(adapter), str(merged), "--trust-remote-code"]) == 0
    assert (merged / "modeling_tiny_remote.py").is_file()
    merged_loss = steps.evaluate(_load(merged), eval_set, 2, CPU)
    print(f"eval loss of the merged model {merged_loss:.6f}")
    assert abs(merged_loss - got) < SAME_TOL * got, (merged_loss, got)


def test_a_loss_of_its_own_is_said_where_accumulation_would_weigh_it_otherwise(compile_dir):
    """The plain decoder's forward computes F.cross_entropy's mean and drops `num_items_in_batch`: with gradient
    accumulation its micro-batches weigh equally, which the run says in one line; the Llama subclass's
    `loss_function` takes the count (no line), and one micro-batch a step needs none."""
    kind, folder = compile_dir
    model = _load(folder)
    note = steps.own_loss_note(model, 2)
    assert (note is not None) == (kind == "plain"), note
    assert note is None or note.startswith("note: TinyPlainForCausalLM computes its own loss (its forward takes no "
                                           "num_items_in_batch): with 2 micro-batches a step, each weighs the same")
    assert steps.own_loss_note(model, 1) is None


@pytest.mark.parametrize("recipe", ["bf16", "qnf4"])
def test_compile_matches_eager_peft(compile_dir, recipe):
    """surogate.compile on the model loaded with trust_remote_code=True: every LoRA linear rewritten, the loss within
    the recipe's bound of eager bf16 PEFT and the LoRA gradients of eager PEFT on the same (quantized) operands.
    Not the cosine against bf16 (test_compile_models' third bound): NF4 of these tiny random weights puts eager
    PEFT on its own NF4 operands at cosine 0.97 from bf16 too, whatever compile does."""
    kind, folder = compile_dir
    peft_model = _attach_lora(_load(folder), {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    eager, same = copy.deepcopy(peft_model), _same_operands(peft_model, recipe)
    compiled = surogate.compile(peft_model, recipe=recipe, arch="cpu", dynamic=False)
    ids = torch.randint(3, 2048, (2, 12), generator=torch.Generator().manual_seed(1))
    truth = eager(input_ids=ids, labels=ids).loss
    truth.backward()
    same_loss = same(input_ids=ids, labels=ids).loss
    same_loss.backward()
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert_every_target_rewritten(compiled.surogate_report)
    loss_bound, grad_bound, _ = BOUNDS[recipe]
    print(f"{kind} {recipe}: loss {loss.item():.6f}, eager PEFT {truth.item():.6f} (bf16), {same_loss.item():.6f} "
          f"(the recipe's operands); LoRA gradients {_rel(_flat(_lora_grads(compiled)), _flat(_lora_grads(same))):.4f} "
          "relative")
    assert abs(loss.item() - truth.item()) < loss_bound * truth.item(), (loss.item(), truth.item())
    grads, reference = _lora_grads(compiled), _lora_grads(same)
    assert grads.keys() == reference.keys() and len(grads) == 14  # q, k, v, o, gate, up, down: A and B
    assert _rel(_flat(grads), _flat(reference)) < grad_bound
    notes = " ".join(compiled.surogate_report.notes)
    assert ("attention: surogate" in notes) == (kind == "llama"), notes
