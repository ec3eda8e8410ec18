"""`group_by_length`: padded batches (sample_packing: false) of examples of similar lengths, on the CPU.

The batches hold every row once, the padding they compute falls (the bundled GSM8K sample: the log's line), the
order is the seed's, the longest batch comes first, and `surogate train` resumes a grouped run exactly."""

from __future__ import annotations


import pytest
import torch
from tiny_models import save_tiny_model, tiny_raw_config

from surogate.training import buckets, steps
from surogate.training.config import ConfigError, from_dict
from surogate.training.data import ExampleRows, grouped_batch_rows, padding_share
from surogate.training.train import train

LENGTHS = [int(v) for v in torch.randint(20, 500, (437,), generator=torch.Generator().manual_seed(0))]


def test_every_row_once_longest_batch_first_and_the_seed_decides():
    batches = grouped_batch_rows(LENGTHS, 8, seed=3)
    rows = torch.cat(batches).tolist()
    assert sorted(rows) == list(range(len(LENGTHS)))
    assert [len(b) for b in batches].count(8) == len(LENGTHS) // 8 and len(batches) == -(-len(LENGTHS) // 8)
    assert max(LENGTHS[i] for i in batches[0].tolist()) == max(LENGTHS)
    again = grouped_batch_rows(LENGTHS, 8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = grouped_batch_rows(LENGTHS, 8, seed=4)
    assert [b.tolist() for b in other] != [b.tolist() for b in batches]
    dropped = grouped_batch_rows(LENGTHS, 8, seed=3, drop_last=True)
    assert len(dropped) == len(LENGTHS) // 8 and all(len(b) == 8 for b in dropped)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        grouped_batch_rows(LENGTHS, 0)
    assert grouped_batch_rows([], 4) == []


def test_grouping_cuts_the_padding_computed():
    from surogate.training.data import batch_rows

    random = padding_share(LENGTHS, list(batch_rows(len(LENGTHS), 8, True, 0)), pad_to=1)
    grouped = padding_share(LENGTHS, grouped_batch_rows(LENGTHS, 8, 0), pad_to=1)
    assert random > 0.3 and grouped < 0.05  # uniform lengths 20-500: about 40% padding at random
    assert padding_share([4, 4], [torch.tensor([0, 1])], pad_to=8) == 0.5  # rows rounded up to the bucket


def _rows(lengths: list[int]) -> ExampleRows:
    ids = [[1] * n for n in lengths]
    return ExampleRows.from_lists(ids, ids, None, max(lengths))


def test_padded_rows_group_packed_rows_do_not_and_the_log_line_says_so():
    rows = _rows(LENGTHS)
    grouped = rows.batch_rows(8, shuffle=True, seed=0, group_by_length=True)
    assert [b.tolist() for b in grouped] == [b.tolist() for b in grouped_batch_rows(LENGTHS, 8, 0)]
    plain = rows.batch_rows(8, shuffle=True, seed=0)
    assert padding_share(LENGTHS, grouped) < padding_share(LENGTHS, plain)
    longest_first = rows.batch_rows(8, group_by_length=True)  # unshuffled (evaluation): longest first
    assert sorted(torch.cat(longest_first).tolist()) == list(range(len(LENGTHS)))
    widths = [max(LENGTHS[i] for i in b.tolist()) for b in longest_first]
    assert widths == sorted(widths, reverse=True) and padding_share(LENGTHS, longest_first) < 0.05
    note = rows.padding_note(8, 0, True, group_by_length=False)
    assert note.startswith("data: padded batches of 8: ") and "group_by_length: true would cut that to" in note
    assert "lengths chosen from the data" in note
    short = rows.padding_note(8, 0, True, group_by_length=False, runs=1)  # a one-epoch run: fewer buckets
    assert float(short.split(": ")[2].split("%")[0]) > float(note.split(": ")[2].split("%")[0])
    assert "would cut" not in rows.padding_note(8, 0, True, group_by_length=True)
    assert "lengths chosen" not in rows.padding_note(8, 0, False, group_by_length=True)  # no CUDA graphs
    packed = ExampleRows.from_lists([[1] * 10], [[1] * 10], [list(range(10))], 16)
    assert packed.padding_note(8, 0, True, True) is None
    assert [b.tolist() for b in packed.batch_rows(1, True, 0, group_by_length=True)] == [[0]]


def test_the_config_key_and_micro_batches(tmp_path):
    cfg = from_dict({"sample_packing": False, "group_by_length": True, "per_device_train_batch_size": 8})
    assert cfg.group_by_length and not from_dict({}).group_by_length  # off by default
    with pytest.raises(ConfigError, match="group_by_length: expected true or false"):
        from_dict({"group_by_length": "yes"})
    rows = _rows(LENGTHS)
    micro = steps.MicroBatches(rows, cfg)
    first = [next(micro)["input_ids"].shape for _ in range(micro.per_epoch)]
    assert first[0][1] == max(LENGTHS)  # the longest batch first
    want = grouped_batch_rows(LENGTHS, 8, cfg.seed, drop_last=True)
    assert [s[1] for s in first] == [max(LENGTHS[i] for i in b.tolist()) for b in want]
    resumed = steps.MicroBatches(rows, cfg, epoch=0, index=5)
    assert next(resumed)["input_ids"].shape == first[5]
    chosen = micro.shape_buckets()  # the CUDA graph lengths, from the widths of the first epoch's batches
    assert chosen == buckets.choose([s[1] for s in first]) and 1 < len(chosen) <= buckets.MOST
    # For a run of so many micro-steps: as many buckets as pay for their capture (one epoch: fewer; very long: all).
    short = micro.shape_buckets(micro_steps=micro.per_epoch)
    assert short == buckets.choose([s[1] for s in first], runs=1) and len(short) < len(chosen)
    assert micro.shape_buckets(micro_steps=10_000 * micro.per_epoch) == chosen


def test_micro_step_hands_the_chosen_buckets_to_graphed_step(monkeypatch):
    from surogate.training import graphed_step

    made = {}

    class Recorder:
        def __init__(self, model, **kwargs):
            made.update(kwargs)
            self.buckets, self.pad_to, self.failure, self.graphs = kwargs["buckets"], 128, None, {}

        def __call__(self, **batch):  # a graph per length, as GraphedStep keys them: (..., padded length)
            self.graphs.setdefault(("rows", batch["input_ids"].shape[-1]), None)
            return torch.tensor(1.0)

    monkeypatch.setattr(graphed_step, "GraphedStep", Recorder)
    cfg = from_dict({"cuda_graphs": "true"})
    said = {}
    for chosen in ((96, 160), (480,), ()):
        lines: list[str] = []
        step = steps.MicroStep(torch.nn.Linear(2, 2), cfg, torch.device("cuda"), lines.append, graphs=True,
                               shape_buckets=chosen)
        assert made["buckets"] == chosen
        step({"input_ids": torch.zeros(1, 4, dtype=torch.long)})
        said[chosen] = lines[0]
    assert "one of 2 lengths chosen from the data and the run's length, 96, 160" in said[(96, 160)]
    assert "rows padded to 480, the one length chosen" in said[(480,)]
    assert "rows padded to a multiple of 128" in said[()]
    lines.clear()
    for width in (4, 4, 9, 4):  # a later length's first batch captures a graph: one line, none on replays
        step({"input_ids": torch.zeros(1, width, dtype=torch.long)})
    assert len(lines) == 1 and lines[0].startswith("cuda_graphs: captured the graph of rows padded to 9 tokens in ")
    assert lines[0].endswith("(warm-up, capture; 2 graphs now)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"))


def test_a_grouped_run_logs_its_padding_and_resumes_exactly(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SUROGATE_CACHE_DIR", str(tmp_path / "cache"))
    extra = {"sample_packing": False, "group_by_length": True, "max_steps": 3, "eval_steps": None,
             "per_device_train_batch_size": 4, "dataset": {"max_train_samples": 24, "eval_split": None}}
    lines: list[str] = []
    straight = train(from_dict(tiny_raw_config(model_dir, tmp_path / "straight", **extra)), log=lines.append)
    note = next(line for line in lines if line.startswith("data: padded batches of 4: "))
    assert "would cut" not in note  # grouped already

    def stop_after_2(record: dict) -> None:
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(from_dict(tiny_raw_config(model_dir, tmp_path / "cut", **extra)), log=lambda line: None,
              on_step=stop_after_2)
    resumed = train(from_dict(tiny_raw_config(model_dir, tmp_path / "cut", **extra, resume_from_checkpoint=True)),
                    log=lambda line: None)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    with pytest.raises(ConfigError, match="group_by_length"):  # another order: refused
        train(from_dict(tiny_raw_config(model_dir, tmp_path / "cut", **{**extra, "group_by_length": False,
                                                                        "max_steps": 4},
                                        resume_from_checkpoint=True)), log=lambda line: None)


def test_evaluation_batches_padded_rows_longest_first_and_the_loss_is_the_same(model_dir):
    """steps.evaluate's token-weighted mean over length-sorted batches equals the mean over the rows one by one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 100, (int(n),), generator=g).tolist() for n in torch.randint(4, 40, (9,), generator=g)]
    rows = ExampleRows.from_lists(ids, ids, None, 64)
    got = steps.evaluate(model, rows, 4, torch.device("cpu"))
    single = [(steps.predicted_tokens(rows.batch([i])), model(**rows.batch([i])).loss) for i in range(len(rows))]
    want = sum(float(loss) * n for n, loss in single) / sum(n for n, _ in single)
    assert abs(got - want) < 1e-5


def test_packed_runs_say_grouping_has_no_effect(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SUROGATE_CACHE_DIR", str(tmp_path / "cache"))
    lines: list[str] = []
    train(from_dict(tiny_raw_config(model_dir, tmp_path / "out", group_by_length=True, max_steps=1, eval_steps=None,
                                    dataset={"max_train_samples": 8, "eval_split": None})), log=lines.append)
    assert any("group_by_length: no effect with sample_packing: true" in line for line in lines)
    assert not any(line.startswith("data: padded batches") for line in lines)


