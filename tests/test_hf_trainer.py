"""A compiled model under Hugging Face `Trainer` / TRL's `SFTTrainer` (found by a new-user pass): the columns
Trainer keeps, checkpointing Trainer turns on after `compile`, and the backbone called directly (TRL's fused LM
head) with packed rows."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect

import pytest
import torch
import transformers as T
from peft import LoraConfig, get_peft_model
from test_user_inputs import LORA, _lora_grads, _model, _pair, _rel
from test_compile_models import V, tiny_config

import surogate
from surogate.compiler import _attach_lora


def _packed(first: int = 9, second: int = 13):
    """Two examples packed in one row with `position_ids` restarting at 0, and each alone."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(1, V, (1, first), generator=g), torch.randint(1, V, (1, second), generator=g)
    positions = torch.cat([torch.arange(first), torch.arange(second)])[None]
    return torch.cat([a, b], 1), positions, a, b


def test_forward_keeps_hfs_signature_so_trainer_keeps_position_ids():
    """Trainer's `remove_unused_columns` keeps the dataset columns the forward names: the wrapper named only
    input_ids, attention_mask and labels, so a `position_ids` column (packed rows) was dropped silently."""
    model, eager = _pair("llama")
    hf, plain = model.get_base_model(), eager.get_base_model()
    assert inspect.signature(hf.forward) == inspect.signature(plain.forward)
    ids, positions, _, _ = _packed()
    mask = torch.ones_like(ids)
    with torch.no_grad():  # HF's positional order: input_ids, attention_mask, position_ids
        by_position = hf(ids, mask, positions, labels=ids).loss
        by_name = hf(input_ids=ids, attention_mask=mask, position_ids=positions, labels=ids).loss
    assert by_position == by_name
    with pytest.raises(TypeError, match="multiple values for argument 'input_ids'"):
        hf(ids, input_ids=ids)


def test_hf_checkpointing_turned_on_after_compile_is_refused():
    """Trainer turns transformers' checkpointing on at `train()` (TRL's configs by default), after `compile`: the
    blocks then ran eagerly without a word (0 graphs). Refused in one line, by each of the model's methods
    (`activation_checkpointing_enable` is transformers 5.25's name, 5.17 has only the other);
    `merge_and_unload()` gives them back."""
    model, _ = _pair("llama")
    methods = [m for m in ("activation_checkpointing_enable", "gradient_checkpointing_enable")
               if hasattr(type(model.get_base_model()), m)]
    assert "gradient_checkpointing_enable" in methods
    for method in methods:
        with pytest.raises(ValueError, match="set gradient_checkpointing=False in TrainingArguments"):
            getattr(model, method)()
    hf = model.merge_and_unload()
    for method in methods:
        assert getattr(hf, method).__func__ is getattr(type(hf), method)  # transformers' own again
    hf.gradient_checkpointing_enable()


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_backbone_called_directly_keeps_packed_examples_apart(name):
    """TRL's fused LM head calls `model.base_model(...)` with packed rows' `position_ids`, past the CausalLM's
    forward that computes the segments: each packed example attended to the one before it (0.4 nats off)."""
    model, eager = _pair(name)
    ids, positions, a, b = _packed()
    with torch.no_grad():
        packed = model.get_base_model().model(input_ids=ids, position_ids=positions).last_hidden_state
        alone = eager.get_base_model().model(input_ids=b).last_hidden_state
    assert _rel(packed[:, a.shape[1]:], alone) < 0.02


def test_an_outer_torch_compile_runs_surogates_compiled_blocks():
    """Trainer's `torch_compile=True` wraps the compiled model in `torch.compile` again: Dynamo traced into the
    blocks and failed (`maybe_mark_dynamic` is forbidden there). The outer compile now breaks its graph at the
    model's forward, which runs as without it: the same loss, no graph added to surogate's."""
    model, _ = _pair("llama")
    ids, positions, _, _ = _packed()
    loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
    graphs = model.surogate_report.graphs
    outer = torch.compile(model, backend="eager")
    again = outer(input_ids=ids, position_ids=positions, labels=ids).loss
    again.backward()
    assert torch.equal(loss.detach(), again.detach())
    assert model.surogate_report.graphs == graphs
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_reference_adapter_and_disabled_adapter_match_peft():
    """TRL's DPO, KTO and GRPO (beta > 0) score a reference with the same compiled model: a PeftModel given to them
    gets a frozen copy of its adapter, "ref", added after `compile` and made active around the reference forward;
    a model given with `peft_config` runs under `disable_adapter()`. Each state must be PEFT's, not the graph traced
    for another (Dynamo guards on the active adapter and on `disable_adapters`)."""
    model, eager = _pair("llama")
    ids = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(5))
    for m in (model, eager):
        m.add_adapter("ref", m.peft_config["default"])
        with torch.no_grad():
            params = dict(m.named_parameters())
            for name, p in params.items():
                if ".default." in name:
                    params[name.replace(".default.", ".ref.")].copy_(p)
                    if "lora_B" in name:
                        p.mul_(-2.0)  # the policy moved away from the reference
    with torch.no_grad():
        outputs = {}
        for adapter in ("ref", "default", None, "ref"):
            if adapter is None:
                with model.disable_adapter(), eager.disable_adapter():
                    got, want = model(input_ids=ids).logits, eager(input_ids=ids).logits
            else:
                model.set_adapter(adapter), eager.set_adapter(adapter)
                got, want = model(input_ids=ids).logits, eager(input_ids=ids).logits
            assert _rel(got, want) < 0.04, adapter  # bf16 rounding of the LoRA branch: 0.02
            outputs[adapter] = want
    # the three states are far apart, so a graph of one state served for another would fail the bound above
    assert min(_rel(outputs[a], outputs[b]) for a, b in (("ref", "default"), ("ref", None), ("default", None))) > 0.2


def test_many_kinds_of_call_stay_compiled():
    """Each kind of call (grad or not, labels or not, each adapter, adapter disabled) compiles the shared block
    function once: past Dynamo's default limit of 8 graphs the next kind ran every linear unfused, with one torch
    warning. A preference trainer's mix (policy, reference adapter, eval) came within one of it."""
    model, _ = _pair("llama")
    model.add_adapter("ref", model.peft_config["default"])
    ids = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(5))

    def every_kind():
        for state in ("default", "ref", None):
            if state is None:
                context = model.disable_adapter()
            else:
                model.set_adapter(state)
                context = contextlib.nullcontext()
            with context:
                for grad in (True, False):
                    with torch.set_grad_enabled(grad):
                        model(input_ids=ids, labels=ids), model(input_ids=ids)

    every_kind()
    assert model.surogate_report.graphs > 8  # 8: the limit cut the rest off to eager
    graphs = model.surogate_report.graphs
    every_kind()
    assert model.surogate_report.graphs == graphs  # each kind's graph is reused


def _head_pair(head: str, num_labels: int):
    """(compiled, eager PEFT copy) of a tiny Llama with a classification head (`score`, trained in full, as PEFT's
    SEQ_CLS and TOKEN_CLS tasks save it), no dropout."""
    config = tiny_config("llama")
    config.num_labels, config.pad_token_id, config.classifier_dropout = num_labels, 0, 0.0
    torch.manual_seed(0)
    cls = {"seq": T.AutoModelForSequenceClassification, "token": T.AutoModelForTokenClassification}[head]
    model = cls.from_config(config).to(torch.bfloat16)
    task = {"seq": "SEQ_CLS", "token": "TOKEN_CLS"}[head]
    peft_model = get_peft_model(model, LoraConfig(task_type=task, **LORA))
    eager = copy.deepcopy(peft_model)
    with pytest.warns(UserWarning, match="non-LoRA parameters are trainable"):  # the head
        return surogate.compile(peft_model, recipe="bf16", arch="cpu"), eager


@pytest.mark.parametrize("head", ["seq", "token"])
def test_a_classification_heads_labels_are_its_own(head):
    """A sequence-classification head with `num_labels=1` (a reward model, regression) takes a float per row, a
    token-classification head a class per token, unshifted: the causal LM's label rules refused the floats and
    dropped the label of a left-padded row's first real token (LoRA gradients 0.29 off PEFT's)."""
    model, eager = _head_pair(head, 1 if head == "seq" else 5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0  # left-padded
    if head == "seq":
        labels = torch.tensor([0.5, -1.0])
    else:
        labels = torch.randint(0, 5, (2, 12), generator=g)
        labels[0, :4] = -100
    losses = []
    for m in (model, eager):
        loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    assert _rel(losses[0], losses[1]) < 2e-3  # measured 1e-5 (token), 2e-4 (seq)
    assert _rel(_lora_grads(model), _lora_grads(eager)) < 0.04  # bf16 rounding of the LoRA branch: 0.009
    assert not model.surogate_report.fallbacks  # no LM head to chunk: said in a note, not as a fallback


def test_a_forward_patched_before_compile_keeps_its_own_options():
    """TRL's preference trainers given `peft_config` put a fused log-prob head on the model's forward (wrapped with
    `functools.wraps`, an option `fused_lm_head`) before the user compiles it: the chunked loss ran instead, and
    TRL failed reading `log_probs` off its output (AttributeError). A call that sets such an option runs the
    patched forward; the others keep the chunked head."""
    peft_model = _attach_lora(_model("llama"), LORA)
    eager = copy.deepcopy(peft_model)
    for m in (peft_model.get_base_model(), eager.get_base_model()):
        original = m.forward

        @functools.wraps(original)
        def fused(*args, fused_lm_head=False, _original=original, _m=m, **kwargs):
            if not fused_lm_head:
                return _original(*args, **kwargs)
            hidden = _m.model(input_ids=kwargs["input_ids"]).last_hidden_state
            return {"log_probs": torch.log_softmax(_m.lm_head(hidden).float(), -1)}

        m.forward = fused
    model = surogate.compile(peft_model, recipe="bf16", arch="cpu")
    ids = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model(input_ids=ids, labels=ids, fused_lm_head=True)["log_probs"]
        want = eager(input_ids=ids, labels=ids, fused_lm_head=True)["log_probs"]
        assert _rel(got, want) < 0.02  # measured 0.003
        assert model(input_ids=ids, labels=ids).logits is None  # the chunked head


@pytest.mark.parametrize("cls,head,task", [(T.AutoModelForSequenceClassification, "score", "SEQ_CLS"),
                                           (T.AutoModelForQuestionAnswering, "qa_outputs", "QUESTION_ANS")])
@pytest.mark.parametrize("named", [False, True])
def test_a_classification_model_without_peft_gets_its_peft_task(cls, head, task, named):
    """`compile` attaches LoRA to a model without PEFT as PEFT's task for its head: as CAUSAL_LM a classification
    model failed in PEFT (no `prepare_inputs_for_generation`), and a task named in the options failed twice named
    (TypeError). The head trains in full (PEFT's `modules_to_save`)."""
    config = tiny_config("llama")
    config.num_labels, config.pad_token_id = 2, 0
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="non-LoRA parameters are trainable"):
        model = surogate.compile(cls.from_config(config).to(torch.bfloat16), recipe="bf16", arch="cpu",
                                 lora={"task_type": task} if named else None)
    assert model.peft_config["default"].task_type == task
    assert {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n} == {head}
    from surogate.ops.modules import _human_count, parameter_counts

    counts = parameter_counts(model)
    whole = sum(p.numel() for p in getattr(model.get_base_model(), head).parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert (counts.trainable, counts.trainable_other) == (lora + whole, whole)  # the head is not counted as LoRA
    assert f"params (LoRA {_human_count(lora)} + {_human_count(whole)} other)" in str(counts)
    ids = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(1))
    if head == "score":
        model(input_ids=ids).logits.float().sum().backward()
    else:
        model(input_ids=ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4])).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_compiled_model_is_not_deep_copied():
    """A reference (or EMA) model made by `copy.deepcopy` after `compile` ran the original's modules: its own weights
    were never read (a DPO reference equal to the policy at every step, without a word). Refused in one line;
    after `merge_and_unload()` the plain model copies as usual."""
    model, _ = _pair("llama")
    ids = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(5))
    for m in (model, model.get_base_model()):
        with pytest.raises(TypeError, match="deep-copy the model before surogate.compile"):
            copy.deepcopy(m)
    hf = model.merge_and_unload()
    twin = copy.deepcopy(hf)
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1.0)
        assert _rel(twin(input_ids=ids).logits, hf(input_ids=ids).logits) > 1.0  # the copy runs its own weights
