"""planner/budget.py: under one memory limit, each side's pick is the fastest of its own configurations
predicted to fit (stock: brute force over every micro-batch size and mode of unsliced 1F1B), and
what it gave up is named."""
import pytest

from seqpipe_ds.planner.budget import SEQPIPE_MODES, budget, stock_need
from seqpipe_ds.planner.fit import read_model_file
from seqpipe_ds.planner.planning import cost_model, makespan_plan, memory_by_mode
from seqpipe_ds.planner.recompute import RECOMPUTE_MODES
from seqpipe_ds.planner.search import NoFit
from seqpipe_ds.slicing import make_plan

STAGES, BATCH, SEQ = 2, 4, 128

def stock_options(found):
    """(makespan, peak, mode, micro-batch size) of every unsliced 1F1B configuration stock can run, priced
    directly, without the KV cache (stock's engine has none)."""
    memory = memory_by_mode(found, STAGES, SEQ, RECOMPUTE_MODES)
    options = []
    for mode in RECOMPUTE_MODES:
        costs = cost_model(found, STAGES, recompute=mode)
        for size in (m for m in (1, 2, 4) if m <= max(found.model.batch_sizes)):
            candidate = costs.predict("slice-1f1b", BATCH // size, make_plan(1, 1, size, SEQ),
                                      memory[mode].without_cache())
            options.append((candidate.makespan, candidate.peak, mode, size))
    return options


@pytest.mark.timeout(300)
def test_each_side_picks_its_fastest_fitting_configuration(fitted_recompute_model):
    found = read_model_file(str(fitted_recompute_model))
    options = stock_options(found)
    need = min(o for o in options if o[2] == "none")[1]  # the peak of the fastest without recomputation
    assert stock_need(found, STAGES, BATCH) == pytest.approx(need, rel=1e-12)
    gave_up_recompute = False
    for fraction in (1.0, 0.85, 0.7):
        limit = fraction * need
        result = budget(found, STAGES, BATCH, limit)
        stock = result.stock.within
        assert stock.makespan == pytest.approx(min(o for o in options if o[1] <= limit)[0], rel=1e-12)
        assert stock.peak <= limit and len(stock.plan.units()) == 1  # unsliced micro-batches
        assert result.stock.unlimited.makespan == pytest.approx(min(options)[0], rel=1e-12)
        seqpipe = result.seqpipe.within
        assert seqpipe.peak <= limit and seqpipe.recompute in SEQPIPE_MODES
        searched = makespan_plan(found, STAGES, BATCH, SEQ, found.config["granularity"],
                                 memory=memory_by_mode(found, STAGES, SEQ, SEQPIPE_MODES), memory_limit=limit,
                                 recompute_modes=SEQPIPE_MODES).best
        assert seqpipe.makespan == searched.makespan
        for pick in (result.stock, result.seqpipe):
            assert pick.within.makespan >= pick.unlimited.makespan
            same = [(c.recompute, c.micro_batch_size, c.schedule, c.plan) for c in (pick.within, pick.unlimited)]
            assert (pick.gave_up() == "nothing") == (same[0] == same[1])
            if pick.within.recompute != pick.unlimited.recompute:
                gave_up_recompute = True
                assert f"recompute {pick.within.recompute}" in pick.gave_up() and "step time" in pick.gave_up()
    assert gave_up_recompute  # some limit made a side recompute


@pytest.mark.timeout(120)
def test_bad_limits_are_one_clear_error(fitted_recompute_model):
    found = read_model_file(str(fitted_recompute_model))
    states = max(memory_by_mode(found, STAGES, SEQ, ("none",))["none"].static_bytes)
    with pytest.raises(ValueError, match="below the parameters, gradients and optimizer states"):
        budget(found, STAGES, BATCH, 0.9 * states)
    with pytest.raises(NoFit, match="the smallest peak found is .* with recompute"):
        budget(found, STAGES, BATCH, states * 1.000001)
