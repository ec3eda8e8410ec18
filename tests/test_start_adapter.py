"""Training on from an existing LoRA adapter: `lora_model_dir` in `surogate train`, and the Python path
(`PeftModel.from_pretrained(..., is_trainable=True)` then `surogate.compile`), against eager PEFT on the same
loaded adapter.

The adapter has a shape of its own (r=8, alpha 16, q/v/down), unlike the run's defaults (16, 32, every
projection), and factors far from PEFT's init (B = 0), so that a run that trained a fresh adapter, or this one at
another scale, fails the comparisons: through the trainer the adapter moves the loss by 3.7%, on a model of larger
weights (initializer_range 0.5: at 0.1 the frozen head keeps the loss within 0.6% of ln(vocab) whatever LoRA does);
through the Python path it moves the LoRA gradients (relative error 1.38 from a fresh adapter's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_compile_models import BOUNDS, _flat, _lora_grads, _rel, _same_operands, tiny_config
from tiny_models import save_tiny_model, tiny_raw_config

import surogate
from surogate.training import checkpoint, setup, steps
from surogate.training.adapters import adapter_state_dict
from surogate.training.cli import main
from surogate.training.config import ConfigError, from_dict
from surogate.training.data import load_splits
from surogate.training.train import train

SHAPE = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}
CPU = torch.device("cpu")
SAME_TOL = 2e-3  # loss, relative, against eager PEFT on the same operands (measured <= 4.3e-4)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SUROGATE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "surogate-cache"))


def _quiet(line: str) -> None:
    pass


def _randomize(peft_model, seed: int = 1, std: float = 0.3) -> None:
    """LoRA factors far from PEFT's init (B = 0): the adapter changes the model's outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _write_adapter(base_dir: Path, out: Path, **shape) -> Path:
    """A LoRA adapter as PEFT saves it, trained (here: drawn) on the model in `base_dir`."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    peft_model = get_peft_model(base, LoraConfig(**{**SHAPE, **shape}, task_type="CAUSAL_LM"))
    _randomize(peft_model)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), initializer_range=0.5)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    return _write_adapter(model_dir, tmp_path_factory.mktemp("adapter"))


def _raw(model_dir: Path, out: Path, adapter: Path | None, **extra) -> dict:
    """tiny_raw_config without its LoRA keys (the adapter decides them), padded rows (eager PEFT attends across
    packed examples) and one micro-batch a step (the step's loss is that batch's mean)."""
    raw = tiny_raw_config(model_dir, out, **{"sample_packing": False, "gradient_accumulation_steps": 1,
                                             "eval_steps": None, "max_steps": 2, **extra})
    for key in ("lora_rank", "lora_alpha", "lora_target_modules"):
        raw.pop(key)
    if adapter is not None:
        raw["lora_model_dir"] = str(adapter)
    return raw


def _eager(model_dir: Path, adapter: Path, recipe: str):
    """Eager PEFT: the adapter loaded by PeftModel.from_pretrained onto the bf16 base, whose target layers then
    hold the recipe's operands (tests/test_compile_models.py's `_same_operands`)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    return _same_operands(PeftModel.from_pretrained(base, adapter), recipe).eval()


def _first_batch_and_eval(cfg):
    """The run's first micro-batch and its eval rows, read as `surogate train` reads them."""
    tokenizer = setup.load_tokenizer_for(cfg, _quiet)
    train_set, eval_set = load_splits(cfg, tokenizer, _quiet)
    return next(steps.MicroBatches(train_set, cfg)), eval_set


def _rel_err(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("recipe", ["bf16", "qfp8", "qnf4"])
def test_a_run_starts_from_the_adapter_and_writes_one_peft_loads(recipe, model_dir, adapter_dir, tmp_path,
                                                                  monkeypatch):
    """Step 1 starts from the adapter's LoRA weights (==); its loss and the eval loss before training are eager
    PEFT's on base + adapter; the adapter written at the end keeps the start adapter's shape and, loaded by
    PeftModel.from_pretrained onto the base, gives the run's final eval loss. Eager PEFT runs on the recipe's base
    operands (`_same_operands`: its quantized weights, dequantized), so what is left is bf16 compute: measured at
    most 4.3e-4 relative (qfp8's eval), bound 2e-3; the adapter moves the loss by 3.7%."""
    cfg = from_dict(_raw(model_dir, tmp_path / "out", adapter_dir, recipe=recipe))
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules) == (8, 16.0, ["down_proj", "q_proj", "v_proj"])
    at_start = _spy_on_compile(monkeypatch)
    result = train(cfg, log=_quiet)

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert at_start.keys() == saved.keys() and all(torch.equal(at_start[k], saved[k]) for k in saved)
    batch, eval_set = _first_batch_and_eval(cfg)
    eager = _eager(model_dir, adapter_dir, recipe)
    with torch.no_grad():
        want = float(eager(**batch).loss)
        with eager.disable_adapter():
            bare = float(eager(**batch).loss)
    assert _rel_err(bare, want) > 4 * SAME_TOL  # the adapter matters: a fresh one could not pass the next line
    assert _rel_err(result.history[0]["loss"], want) < SAME_TOL, (result.history[0]["loss"], want)
    assert _rel_err(result.first_eval_loss, steps.evaluate(eager, eval_set, 2, CPU)) < SAME_TOL

    written = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], sorted(written["target_modules"])) == (8, 16, sorted(SHAPE[
        "target_modules"]))
    trained = _eager(model_dir, result.adapter_dir, recipe)
    assert _rel_err(steps.evaluate(trained, eval_set, 2, CPU), result.final_eval_loss) < SAME_TOL
    final = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert final.keys() == saved.keys() and not all(torch.equal(final[k], saved[k]) for k in saved)  # it trained


def test_a_resumed_run_takes_its_checkpoint_over_the_start_adapter(model_dir, adapter_dir, tmp_path):
    """Interrupted after step 2 and resumed (lora_model_dir still set): the same losses (==) and adapter
    (torch.equal) as a run that never stopped, so the checkpoint's weights replaced the start adapter's."""
    def cfg(out: Path, **extra):
        return from_dict(_raw(model_dir, out, adapter_dir, **{"max_steps": 4, "dataset": {"eval_split": None},
                                                              **extra}))

    straight = train(cfg(tmp_path / "straight"), log=_quiet)

    def stop_at_2(record: dict) -> None:
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "cut"), log=_quiet, on_step=stop_at_2)
    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path / "cut")] == [2]
    resumed = train(cfg(tmp_path / "cut", resume_from_checkpoint=True), log=_quiet)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    a = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _spy_on_compile(monkeypatch) -> dict:
    """The LoRA weights of the model `surogate train` compiled, taken before its first step."""
    at_start = {}
    compile_model = setup.compile_model

    def spy(model, cfg, log=setup.log_stderr):
        core = compile_model(model, cfg, log)
        at_start.update({k: v.clone() for k, v in adapter_state_dict(core).items()})
        return core

    monkeypatch.setattr(setup, "compile_model", spy)
    return at_start


def test_a_moe_adapter_starts_with_its_expert_lora(tmp_path, monkeypatch):
    """An adapter with PEFT target_parameters (one LoRA pair per expert stack, Qwen3-MoE) brings them: the run's
    lora_target_parameters are the adapter's, its expert factors are step 1's (==), and the adapter written keeps
    them (qfp8: block-FP8 experts)."""
    model = save_tiny_model(tmp_path / "moe", arch="qwen3_moe")
    experts = ["experts.gate_up_proj", "experts.down_proj"]
    adapter = _write_adapter(model, tmp_path / "adapter", r=4, target_modules=["q_proj"], target_parameters=experts)
    cfg = from_dict(_raw(model, tmp_path / "out", adapter, recipe="qfp8", max_steps=1,
                         dataset={"eval_split": None}))
    assert (cfg.lora_target_modules, cfg.lora_target_parameters) == (["q_proj"], sorted(experts))
    at_start = _spy_on_compile(monkeypatch)
    result = train(cfg, log=_quiet)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(".experts." in k for k in saved) and at_start.keys() == saved.keys()
    assert all(torch.equal(at_start[k], saved[k]) for k in saved)
    written = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert sorted(written["target_parameters"]) == sorted(experts)


# --- mistakes, each one line before any weight loads -----------------------------------------------

def _edited(adapter_dir: Path, to: Path, **fields) -> Path:
    """A copy of the adapter with `fields` of its adapter_config.json changed."""
    to.mkdir()
    (to / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (to / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return to


@pytest.mark.parametrize("make, expect", [
    (lambda a, t: t / "missing", r"lora_model_dir: '.*missing' is not a folder; give the folder of a LoRA adapter"),
    (lambda a, t: t, r"lora_model_dir: '.*' has no adapter_config.json \(surogate writes an adapter to "),
    (lambda a, t: _run_dir(a, t), r"has no adapter_config.json; the adapter of that run is in its adapter/ folder: "
                                   r"write lora_model_dir: .*run/adapter$"),
    (lambda a, t: _edited(a, t / "ia3", peft_type="IA3"), r"holds a IA3 adapter \(peft_type in adapter_config.json\), "
                                                          r"not LoRA; surogate trains LoRA adapters only"),
    (lambda a, t: _no_weights(a, t), r"has adapter_config.json but no adapter_model.safetensors"),
    (lambda a, t: _edited(a, t / "p", init_lora_weights="pissa_niter_4"), r"init_lora_weights: pissa_niter_4, which "
                                                                          r"fits only a base changed by it"),
    (lambda a, t: _edited(a, t / "m", modules_to_save=["lm_head"]), r"also trains whole modules or rows "
                                                                    r"\(modules_to_save: \['lm_head'\]\)"),
])
def test_a_bad_lora_model_dir_is_one_config_error(make, expect, model_dir, adapter_dir, tmp_path):
    folder = make(adapter_dir, tmp_path)
    with pytest.raises(ConfigError, match=expect):
        from_dict(_raw(model_dir, tmp_path / "out", folder))


def _run_dir(adapter_dir: Path, tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    _edited(adapter_dir, tmp_path / "run" / "adapter")
    return tmp_path / "run"


def _no_weights(adapter_dir: Path, tmp_path: Path) -> Path:
    folder = _edited(adapter_dir, tmp_path / "nw")
    (folder / "adapter_model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("key, value, expect", [
    ("lora_rank", 16, r"^lora_rank: 16, but the adapter in lora_model_dir \('.*'\) has r 8 \(adapter_config.json\), "
                      r"and the run trains the adapter as it is; drop lora_rank$"),
    ("lora_alpha", 32, r"^lora_alpha: 32, but .* has lora_alpha 16 .*; drop lora_alpha$"),
    ("lora_target_modules", ["q_proj"], r"^lora_target_modules: q_proj, but .* has target_modules down_proj, q_proj, "
                                        r"v_proj .*; drop lora_target_modules$"),
    ("lora_target_parameters", ["experts.down_proj"], r"has target_parameters none .*; drop lora_target_parameters"),
])
def test_a_lora_key_that_differs_from_the_adapter_is_refused(key, value, expect, model_dir, adapter_dir, tmp_path):
    with pytest.raises(ConfigError, match=expect):
        from_dict({**_raw(model_dir, tmp_path / "out", adapter_dir), key: value})


def test_lora_keys_equal_to_the_adapter_and_the_dropout_are_taken(model_dir, adapter_dir, tmp_path):
    """The adapter's own values may be written (a stage-1 config reused); lora_dropout written is the run's, unset
    the adapter's."""
    raw = {**_raw(model_dir, tmp_path / "out", adapter_dir), "lora_rank": 8, "lora_alpha": 16.0,
           "lora_target_modules": "v_proj, q_proj, down_proj"}
    assert from_dict(raw).lora_dropout == 0.0
    assert from_dict({**raw, "lora_dropout": 0.1}).lora_dropout == 0.1
    dropped = _edited(adapter_dir, tmp_path / "d", lora_dropout=0.05)
    assert from_dict(_raw(model_dir, tmp_path / "out", dropped)).lora_dropout == 0.05


def test_model_naming_an_adapter_says_which_two_keys_to_write(model_dir, adapter_dir, tmp_path, capsys):
    """`model:` at an adapter folder: one line, exit 2, naming its base and lora_model_dir."""
    raw = _raw(model_dir, tmp_path / "out", None)
    with pytest.raises(ConfigError, match=rf"^model: '{adapter_dir}' holds a LoRA adapter \(adapter_config.json\), not "
                                          rf"a model; to train on from it, write model: {model_dir} \(its "
                                          rf"adapter_config.json names it\) and lora_model_dir: {adapter_dir}$"):
        from_dict({**raw, "model": str(adapter_dir)})
    assert main(["train", "--set", f"model={adapter_dir}", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("surogate: error: model: ") and "lora_model_dir" in err


@pytest.fixture(scope="module")
def deeper_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("deeper"), num_hidden_layers=2)


@pytest.fixture(scope="module")
def wider_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("wider"), hidden_size=48, num_attention_heads=3)


@pytest.mark.parametrize("other, edit, expect", [
    ("deeper", {}, r"does not fit .*deeper.* \(6 LoRA tensors differ, e.g. model.layers.1.mlp.down_proj.lora_A.weight: "
                   r"this model has the layer, the adapter no weights for it\); it was trained on .*tiny-qwen3.*: set "
                   r"model: to the model it was trained on"),
    ("wider", {}, r"\(model.layers.0.mlp.down_proj.lora_B.weight is \[32, 8\] in the adapter, \[48, 8\] in this "
                  r"model\)"),
    (None, {"target_modules": ["c_attn"]}, r"\(PEFT: Target modules \{'c_attn'\} not found in the base model"),
    (None, {"use_dora": True}, r"is a LoRA variant surogate does not train \(use_dora: True in its "
                               r"adapter_config.json\)"),
])
def test_an_adapter_that_does_not_fit_the_model_stops_before_the_weights_load(other, edit, expect, model_dir,
                                                                              adapter_dir, deeper_dir, wider_dir,
                                                                              tmp_path, monkeypatch):
    model = {"deeper": deeper_dir, "wider": wider_dir, None: model_dir}[other]
    folder = _edited(adapter_dir, tmp_path / "a", **edit) if edit else adapter_dir
    raw = _raw(model, tmp_path / "out", folder)

    def no_load(*args, **kwargs):
        raise AssertionError("the weights loaded before the check")

    monkeypatch.setattr(setup, "load_base_model", no_load)
    with pytest.raises(ConfigError, match=f"^lora_model_dir: .*{expect}"):
        train(from_dict(raw), log=_quiet)


# --- the Python path: PeftModel.from_pretrained, then surogate.compile ------------------------------

@pytest.mark.parametrize("recipe", ["bf16", "qfp8", "qnf4"])
def test_compile_trains_on_a_loaded_adapter_as_eager_peft_does(recipe, tmp_path):
    """A PeftModel loaded trainable from a saved adapter (`surogate.load_adapter(..., is_trainable=True)`, which is
    PeftModel.from_pretrained) compiles with the adapter's rank, alpha, targets and weights; its loss and LoRA
    gradients are eager PEFT's on the same loaded adapter within tests/test_compile_models.py's bounds (the loss
    against the FP32 truth; the gradients against the same quantized operands, and their direction against the
    truth). The adapter's B is far from PEFT's zero init, so the gradients from a fresh adapter (A's are 0 there)
    would be far off: measured relative error 1.38 (bounds 0.06-0.09); the loaded one's 0.012-0.015, its loss within
3e-4 of the truth (bounds 1e-3, 5e-3), cosine 0.997 and up."""
    import transformers as T

    def base(dtype=torch.bfloat16):
        torch.manual_seed(0)
        return T.AutoModelForCausalLM.from_config(tiny_config("qwen3")).to(dtype)

    written = get_peft_model(base(), LoraConfig(**SHAPE))
    _randomize(written, std=0.1)
    written.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))

    def loss_and_grads(model):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss.detach()), _flat({k.replace("_orig_mod.", ""): v for k, v in _lora_grads(model).items()})

    truth_loss, truth_grads = loss_and_grads(PeftModel.from_pretrained(base(torch.float32), tmp_path,
                                                                       is_trainable=True))
    loaded = surogate.load_adapter(base(), tmp_path, is_trainable=True)
    _, same_grads = loss_and_grads(_same_operands(loaded, recipe))
    _, fresh_grads = loss_and_grads(_same_operands(get_peft_model(base(), LoraConfig(**SHAPE)), recipe))
    model = surogate.compile(loaded, recipe=recipe, arch="cpu")
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (8, 16, sorted(SHAPE["target_modules"]))
    start = {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    want = {k: v for k, v in written.state_dict().items() if "lora_" in k}
    assert start.keys() == want.keys() and all(torch.equal(start[k], want[k]) for k in want)
    loss, grads = loss_and_grads(model)
    loss_bound, grad_bound, cos_floor = BOUNDS[recipe]
    assert _rel(fresh_grads, same_grads) > 5 * grad_bound  # the adapter matters: a fresh one fails the grads
    assert _rel_err(loss, truth_loss) < loss_bound, (loss, truth_loss)
    assert _rel(grads, same_grads) < grad_bound
    assert float(torch.nn.functional.cosine_similarity(grads, truth_grads, dim=0)) > cos_floor


def test_compile_warns_when_the_loaded_adapter_is_frozen(tmp_path):
    """PeftModel.from_pretrained loads an adapter for inference (LoRA frozen) unless is_trainable=True: compiled,
    nothing would train, which PEFT says nowhere; compile warns with the fix."""
    import transformers as T

    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(tiny_config("qwen3")).to(torch.bfloat16)
    get_peft_model(base, LoraConfig(**SHAPE)).save_pretrained(tmp_path)
    torch.manual_seed(0)
    frozen = PeftModel.from_pretrained(T.AutoModelForCausalLM.from_config(tiny_config("qwen3")).to(torch.bfloat16),
                                       tmp_path)
    with pytest.warns(UserWarning, match=r"LoRA weights are all frozen, so nothing will train: .*is_trainable=True"):
        surogate.compile(frozen, arch="cpu")
