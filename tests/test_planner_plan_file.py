"""Plan files: writing, finding, every failure as one PlanFileError, and TeraPipe's format."""
import json
from types import SimpleNamespace

import pytest

from seqpipe_ds.planner import PlanEntry, PlanFileError, find_plan, read_plans, write_plan

MODEL = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 128, "vocab_size": 256}
SHAPE = {k: v for k, v in MODEL.items() if k != "seq_length"}


def entry(**changes):
    fields = dict(model=dict(MODEL), micro_batch_size=2, tp=1, pp=2, dp=1, batch_slices=[1, 1],
                  input_slices=[[64, 32, 32], [96, 32]], latency=0.5, global_batch_size=8, device="cpu")
    fields.update(changes)
    return PlanEntry(**fields)


def find(path, **changes):
    query = dict(model=SHAPE, micro_batch_size=2, tp=1, pp=2, dp=1, seq_length=128)
    query.update(changes)
    return find_plan(str(path), **query)


LEGACY = [
    {"model_name": "gpt3-1b", "batch_size": 2, "model_parallel_size": 1, "pipeline_length": 2,
     "data_parallel_size": 1, "n_nodes": 1, "gpus_per_node": 2, "latency": 1.25, "batch_slices": [2],
     "input_slices": [[96, 32]]},
    {"model_name": "gpt3-13b", "batch_size": 4, "model_parallel_size": 8, "pipeline_length": 4,
     "data_parallel_size": 1, "n_nodes": 4, "gpus_per_node": 8, "latency": 3.5, "batch_slices": [2, 2],
     "input_slices": [64, 64]},  # one slicing shared by both batch slices
]


@pytest.mark.timeout(60)
def test_write_read_and_replace(tmp_path):
    path = tmp_path / "dp_results.json"
    write_plan(str(path), entry())
    write_plan(str(path), entry(pp=4, latency=0.7))
    assert read_plans(str(path)) == [entry(), entry(pp=4, latency=0.7)]
    write_plan(str(path), entry(latency=0.4, input_slices=[[128], [128]]))  # same setting: replaced
    plans = read_plans(str(path))
    assert len(plans) == 2 and plans[0].latency == 0.4 and plans[0].input_slices == [[128], [128]]
    assert isinstance(json.loads(path.read_text()), list)


@pytest.mark.timeout(60)
def test_find_plan_by_config_object_or_mapping(tmp_path):
    path = tmp_path / "dp_results.json"
    for pp in (2, 4):
        write_plan(str(path), entry(pp=pp, latency=float(pp)))
    write_plan(str(path), entry(model={**MODEL, "hidden_size": 128}, latency=9.0))
    config = SimpleNamespace(**SHAPE, max_position_embeddings=128)  # what GPTConfig offers
    assert find(path, model=config, pp=4).latency == 4.0
    assert find(path, model=SHAPE, pp=2).latency == 2.0
    assert find(path, model={**SHAPE, "hidden_size": 128}).latency == 9.0
    assert find(path, device="cpu", global_batch_size=8).latency == 2.0
    write_plan(str(path), entry(model={**MODEL, "name": "tiny"}, dp=2, latency=5.0))
    write_plan(str(path), entry(model={**MODEL, "name": "tiny", "seq_length": 64}, dp=2, latency=6.0,
                                input_slices=[[64], [64]]))
    assert find(path, model="tiny", dp=2).latency == 5.0  # by name: the sequence length tells them apart
    assert find(path, model="tiny", dp=2, seq_length=64).latency == 6.0


@pytest.mark.timeout(60)
def test_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(PlanFileError, match=f"plan file {missing} does not exist"):
        find(missing)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('[{"model": ')
    with pytest.raises(PlanFileError, match=f"plan file {corrupt} is not valid JSON \\(line 1"):
        find(corrupt)
    not_list = tmp_path / "dict.json"
    not_list.write_text("{}")
    with pytest.raises(PlanFileError, match="must hold a JSON list of plans, not a dict"):
        find(not_list)
    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps([entry().to_json(), {"model": MODEL, "tp": 1}]))
    with pytest.raises(PlanFileError, match=r"entry \[1\] is malformed"):
        find(malformed)
    with pytest.raises(PlanFileError, match="not valid JSON"):
        write_plan(str(corrupt), entry())  # a corrupt file is never overwritten
    assert corrupt.read_text() == '[{"model": '


@pytest.mark.timeout(60)
def test_no_match_lists_what_the_file_holds(tmp_path):
    path = tmp_path / "dp_results.json"
    write_plan(str(path), entry())
    write_plan(str(path), entry(tp=2))
    with pytest.raises(PlanFileError) as error:
        find(path, dp=4)
    message = str(error.value)
    assert message.startswith(f"plan file {path} has no plan for model num_layers=4")
    assert "dp=4" in message and "seq_length=128" in message
    assert "[0] model num_layers=4, hidden_size=64" in message and "tp=1" in message
    assert "[1] model" in message and "tp=2" in message
    with pytest.raises(PlanFileError, match="seq_length=256"):
        find(path, seq_length=256)  # recorded with the model: a different length is another setting
    assert PlanFileError.__mro__[1] is ValueError


@pytest.mark.timeout(60)
def test_slices_must_cover_the_sequence_and_the_micro_batch(tmp_path):
    path = tmp_path / "dp_results.json"
    write_plan(str(path), entry(input_slices=[[64, 32, 32], [96, 16]]))
    with pytest.raises(PlanFileError, match=r"input_slices\[1\] \[96, 16\] do not split the sequence of 128"):
        find(path)
    write_plan(str(path), entry(batch_slices=[1, 2], input_slices=[[128], [128]]))
    with pytest.raises(PlanFileError, match=r"batch_slices \[1, 2\] do not split the micro batch of 2"):
        find(path)
    write_plan(str(path), entry(batch_slices=[1, 1], input_slices=[[128]]))
    with pytest.raises(PlanFileError, match="1 lists of input_slices for 2 batch slices"):
        find(path)


@pytest.mark.timeout(60)
def test_ambiguous_match_asks_for_the_device(tmp_path):
    path = tmp_path / "dp_results.json"
    write_plan(str(path), entry(device="cpu"))
    write_plan(str(path), entry(device="NVIDIA H100"))
    with pytest.raises(PlanFileError, match="has 2 plans for .*give the device"):
        find(path)
    assert find(path, device="NVIDIA H100").device == "NVIDIA H100"


@pytest.mark.timeout(60)
def test_terapipe_format_is_read_and_matched_by_name(tmp_path):
    path = tmp_path / "dp_results.json"
    path.write_text(json.dumps(LEGACY))
    first, second = read_plans(str(path))
    assert first == PlanEntry(model={"name": "gpt3-1b"}, micro_batch_size=2, tp=1, pp=2, dp=1, batch_slices=[2],
                              input_slices=[[96, 32]], latency=1.25, extra={"n_nodes": 1, "gpus_per_node": 2})
    assert second.input_slices == [[64, 64], [64, 64]] and second.tp == 8
    assert find(path, model="gpt3-1b").latency == 1.25
    assert find(path, model={**SHAPE, "name": "gpt3-1b"}, device="cpu").latency == 1.25
    assert find(path, model="gpt3-13b", micro_batch_size=4, tp=8, pp=4, seq_length=128).latency == 3.5
    # Layer shapes alone cannot match a bare name: the message shows what the file holds.
    with pytest.raises(PlanFileError, match=r"\[0\] model 'gpt3-1b' \(TeraPipe format\), micro_batch_size=2"):
        find(path, model=SHAPE)
    with pytest.raises(PlanFileError, match="do not split the sequence of 256"):
        find(path, model="gpt3-1b", seq_length=256)


@pytest.mark.timeout(60)
def test_adding_to_a_terapipe_file_keeps_its_entries_verbatim(tmp_path):
    path = tmp_path / "dp_results.json"
    path.write_text(json.dumps(LEGACY))
    write_plan(str(path), entry())
    items = json.loads(path.read_text())
    assert items[:2] == LEGACY
    assert items[2] == entry().to_json()
    assert find(path).latency == 0.5


def test_schedule_and_peak_round_trip_and_bad_schedule(tmp_path):
    path = tmp_path / "plans.json"
    write_plan(str(path), entry(schedule="slice-1f1b", predicted_peak_bytes=[1.5e9, 1.25e9]))
    found = find(path)
    assert found.schedule == "slice-1f1b" and found.predicted_peak_bytes == [1.5e9, 1.25e9]
    items = json.loads(path.read_text())
    items[0]["schedule"] = "zigzag"
    path.write_text(json.dumps(items))
    with pytest.raises(PlanFileError, match="unknown schedule 'zigzag'"):
        read_plans(str(path))


def tiny_plan_file(tmp_path, input_slices, **fields) -> str:
    """A plan file holding one plan of ``input_slices`` for ``common.tiny_config`` at sequence 16,
    micro-batch 2, one stage (what ``hook_config`` runs)."""
    from common import tiny_config
    cfg = tiny_config()
    model = {k: getattr(cfg, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")}
    plan_path = str(tmp_path / "dp_results.json")
    write_plan(plan_path, PlanEntry(model={**model, "seq_length": 16}, micro_batch_size=2, tp=1, pp=1, dp=1,
                                    batch_slices=[2], input_slices=[input_slices], latency=1.0, **fields))
    return plan_path


def resolve_for_models(plan_path, models):
    """One process, one stage: the slicing the hook resolves from ``plan_path`` for a tiny GPT built
    with each of ``models`` (GPTConfig overrides), or the error it raises."""
    import seqpipe_ds
    from common import tiny_config
    from seqpipe_ds import parallel
    from seqpipe_ds.model import gpt_pipeline
    topology = parallel.initialize(pipeline_parallel_size=1)
    resolved = []
    for overrides in models:
        model = gpt_pipeline(tiny_config(**overrides), topology)
        try:
            resolved.append(list(seqpipe_ds.resolve(hook_config(plan_path), model)[0].seq_slices[0]))
        except ValueError as e:
            resolved.append(str(e))
    return resolved


def hook_config(plan_path, **seqpipe):
    return {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2,
            "seqpipe": {"enabled": True, "seq_length": 16, "plan": plan_path, **seqpipe}}


def _resolve_with_plan(plan_path):
    """One process, one stage: the schedule the hook resolves, with and without the config naming one."""
    import seqpipe_ds
    from common import tiny_config
    from seqpipe_ds import parallel
    from seqpipe_ds.model import gpt_pipeline
    model = gpt_pipeline(tiny_config(), parallel.initialize(pipeline_parallel_size=1))
    plan, schedule = seqpipe_ds.resolve(hook_config(plan_path), model)
    try:
        seqpipe_ds.resolve(hook_config(plan_path, schedule="terapipe"), model)
        conflict = "no error"
    except ValueError as e:
        conflict = str(e)
    return [list(plan.seq_slices[0]), schedule, conflict]


@pytest.mark.timeout(120)
def test_hook_applies_the_planned_schedule(tmp_path):
    import launcher
    plan_path = tiny_plan_file(tmp_path, [8, 4, 4], schedule="slice-1f1b")
    lengths, schedule, conflict = launcher.run(_resolve_with_plan, 1, plan_path=plan_path)[0]
    assert lengths == [8, 4, 4] and schedule == "slice-1f1b"
    assert "was made for 'slice-1f1b'" in conflict
