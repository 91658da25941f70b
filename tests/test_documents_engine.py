"""Packed documents (--reset-attention-mask --reset-position-ids --eod-mask-loss) through the engines:
seqpipe equals stock DeepSpeed pipelining and one process, in float64 with hidden dropout 0.1 at
rel. 1e-10 (as tests/test_engine_exact.py), for every schedule of the registry.

The batches are engine_cases.document_batch: slices cut documents, single-token documents, a document
spans every slice, some rows have no EOD; positions and loss mask are megatron-core's own. Stock
DeepSpeed carries the document starts to its middle stages in the (hidden, starts) tuple its pipeline
passes (the integer member gets no gradient) and attends with the dense mask; seqpipe sends the same
starts with each slice's activation and attends block by block.
"""
import pytest

import engine_cases
from engine_cases import merge
from test_engine_exact import RTOL64, _case, _compare, every_schedule
from seqpipe_ds.schedules import SCHEDULES

DOCUMENTS = {"reset_attention_mask": True, "reset_position_ids": True}
ROPE = {**DOCUMENTS, "position_embedding_type": "rope"}

LAYOUTS = {
    "pp2": (2, [
        (_case(pp=2, mbs=2, gas=2, model=DOCUMENTS),
         every_schedule({"seq_slices": 1}, {"seq_slices": 4}, {"seq_slices": [5, 1, 7, 3]}, {"seq_slices": [1] * 16},
                        {"seq_slices": 4, "batch_slices": 2})),
        # RoPE at the reset positions, grouped-query K/V, each layer recomputed (the rerun replays the cache)
        (_case(pp=2, mbs=2, gas=2, model={**ROPE, "num_query_groups": 2, "recompute_granularity": "full"}),
         every_schedule({"seq_slices": [6, 6, 4]}, {"seq_slices": [3, 13], "batch_slices": 2})),
        # DeepSpeed's own recomputation: its chunks take and return the (hidden, starts) tuple
        (_case(pp=2, mbs=2, gas=1, checkpoint_interval=1, model=DOCUMENTS), every_schedule({"seq_slices": [7, 5, 4]})),
        # positions reset but attention across documents (Megatron lets the flags apart)
        (_case(pp=2, mbs=2, gas=1, model={"position_embedding_type": "rope", "reset_position_ids": True}),
         every_schedule({"seq_slices": 4})),
    ]),
    "pp4": (4, [(_case(pp=4, mbs=2, gas=2, model={**DOCUMENTS, "recompute_granularity": "selective"}),
                 every_schedule({"seq_slices": [5, 1, 7, 3]}))]),
    "pp2_tp2": (4, [(_case(pp=2, tp=2, mbs=2, gas=1, model=ROPE), every_schedule({"seq_slices": 4}))]),
    # sequence parallelism: each TP rank holds its own tokens, all ranks the slice's whole starts
    "pp2_tp2_sp": (4, [(_case(pp=2, tp=2, mbs=2, gas=1, model={**DOCUMENTS, "sequence_parallel": True},
                              ds_config={"pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}),
                        every_schedule({"seq_slices": [6, 8, 2]}))]),
    "pp2_dp2": (4, [(_case(pp=2, dp=2, mbs=2, gas=1, model=DOCUMENTS),
                     every_schedule({"seq_slices": [9, 7], "batch_slices": 2}))]),
}


@pytest.fixture(scope="module")
def results():
    raw = engine_cases.run_layouts({name: (world, [(case, [None, *variants]) for case, variants in cases])
                                    for name, (world, cases) in LAYOUTS.items()})
    return {key: {"reference": merge(runs.pop("reference")), "stock": merge(runs.pop(0)),
                  **{v - 1: merge(r) for v, r in runs.items()}} for key, runs in raw.items()}


PARAMS = [pytest.param(name, c, v, id=f"{name}-case{c}-{v}") for name, (_, cases) in LAYOUTS.items()
          for c, (_, variants) in enumerate(cases) for v in ["stock", *range(len(variants))]]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("layout,case,variant", PARAMS)
def test_documents_match_reference_and_stock(results, layout, case, variant):
    runs = results[layout, case]
    what = f"{layout} case {case} {'stock' if variant == 'stock' else LAYOUTS[layout][1][case][1][variant]}"
    _compare(runs[variant], runs["reference"], RTOL64, what + " vs single process")
    if variant != "stock":
        _compare(runs[variant], runs["stock"], RTOL64, what + " vs stock DeepSpeed")


def test_matrix_covers_every_schedule():
    for name, (_, cases) in LAYOUTS.items():
        assert {v["schedule"] for _, variants in cases for v in variants} == set(SCHEDULES), name
