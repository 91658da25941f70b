"""Layout-invariant hidden dropout (seqpipe_ds.model.dropout) and what attention dropout does.

- the hash's int32 arithmetic gives the bits of its uint32 definition (wrapping products);
- the keep rate lies within binomial bounds, and masks are independent across streams (layers,
  sites), positions, channels, samples and seeds, including the 2 x 2 position-channel corners
  that a xor-combined hash could correlate;
- a sequence cut into slices, and sequence parallelism's per-rank token shares, take their
  positions of the same masks as the whole sequence;
- a GPT with dropout does drop, redraws the same masks for the same samples and others for others;
- attention dropout keeps 1 - p of the attention weights, and initialize gives one notice about it;
- bad input: a probability outside [0, 1), a forward without a sample key.
The engine-level consequences (seqpipe = stock = one process, resume) are in test_engine_exact.py
and test_engine_runs.py.
"""
import math
import warnings

import pytest
import torch

import launcher
from common import make_batch, tiny_config
from seqpipe_ds.model import dropout

SIGMAS = 5  # a binomial count further than this from its mean fails (false alarm ~6e-7 per check)


def _assert_rate(count: int, trials: int, prob: float, what: str):
    mean, sd = trials * prob, math.sqrt(trials * prob * (1 - prob))
    assert abs(count - mean) <= SIGMAS * sd, f"{what}: {count} of {trials}, expected {mean:.0f} ± {SIGMAS * sd:.0f}"


def _mask(p=0.5, seed=1234, numbers=(0, 1, 2, 3), stream=3, positions=range(256), channels=128):
    return dropout.keep_mask(seed, torch.tensor(numbers), stream, torch.tensor(list(positions)), channels, p)


def _lowbias32(x: int) -> int:
    """The uint32 definition, in Python integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash_bits_equal_their_uint32_definition():
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (4096,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    words = torch.cat([words, torch.tensor([0, -1, 2 ** 31 - 1, -2 ** 31], dtype=torch.int32)])
    got = dropout._mix_(words.clone()).tolist()
    assert [g & 0xFFFFFFFF for g in got] == [_lowbias32(w & 0xFFFFFFFF) for w in words.tolist()]


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9])
def test_keep_rate_is_binomial(p):
    mask = _mask(p)
    _assert_rate(int(mask.sum()), mask.numel(), 1 - p, f"kept at p={p}")


def test_masks_are_independent():
    p = 0.5
    base = ~_mask(p)  # dropped elements, (b, t, c)
    others = {"stream": ~_mask(p, stream=4), "seed": ~_mask(p, seed=1235), "samples": ~_mask(p, numbers=(4, 5, 6, 7)),
              "samples beyond 2^32": ~_mask(p, numbers=[2 ** 32 + i for i in range(4)])}
    for what, other in others.items():
        _assert_rate(int((base & other).sum()), base.numel(), p * p, f"dropped in both (other {what})")
    pairs = {"adjacent positions": base[:, 1:] & base[:, :-1], "adjacent channels": base[..., 1:] & base[..., :-1],
             "adjacent samples": base[1:] & base[:-1]}
    for what, both in pairs.items():
        _assert_rate(int(both.sum()), both.numel(), p * p, f"dropped at both {what}")
    corners = base[:, 1:, 1:] & base[:, 1:, :-1] & base[:, :-1, 1:] & base[:, :-1, :-1]
    _assert_rate(int(corners.sum()), corners.numel(), p ** 4, "dropped at all 4 corners of a position-channel square")
    # the same inputs give the same mask
    assert torch.equal(_mask(p), _mask(p))


def test_slices_take_their_positions_of_the_whole_mask():
    whole = _mask(0.1)
    cuts = [0, 100, 101, 180, 256]
    parts = [_mask(0.1, positions=range(a, b)) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(parts, dim=1), whole)
    rows = [_mask(0.1, numbers=(n,)) for n in range(4)]  # batch slices: their own rows
    assert torch.equal(torch.cat(rows, dim=0), whole)


def _sequence_parallel_shares():
    from megatron.core import parallel_state

    from seqpipe_ds import parallel
    parallel.initialize(tensor_parallel_size=2)
    layer = dropout.HiddenDropout(0.3, stream=5, sequence_parallel=True)
    key = dropout.Samples(seed=9, numbers=torch.tensor([7, 8, 9]))
    with dropout.samples(key):
        share = layer(torch.ones(16, 3, 32))  # (T / TP, B, h): this rank's 16 of 32 tokens
    return parallel_state.get_tensor_model_parallel_rank(), share


@pytest.mark.timeout(120)
def test_sequence_parallel_ranks_take_their_positions_of_the_same_mask():
    shares = dict(launcher.run(_sequence_parallel_shares, 2))
    whole = dropout.keep_mask(9, torch.tensor([7, 8, 9]), 5, torch.arange(32), 32, 0.3) / 0.7  # (B, T, h)
    gathered = torch.cat([shares[0], shares[1]], dim=0).transpose(0, 1)  # (B, T, h)
    assert torch.allclose(gathered, whole, rtol=0, atol=1e-6)


def _gpt_losses():
    from seqpipe_ds import parallel
    from seqpipe_ds.model import gpt_pipeline
    topology = parallel.initialize()
    (tokens, positions), labels = make_batch(2, 16, 128, seed=1)
    losses = {}
    for p in (0.0, 0.1):
        module = gpt_pipeline(tiny_config(hidden_dropout=p), topology, seed=3)
        for numbers in ((0, 1), (0, 1), (2, 3)):
            with dropout.samples(dropout.Samples(seed=3, numbers=torch.tensor(numbers))):
                losses.setdefault(p, []).append(module.loss_fn(module((tokens, positions)), labels).item())
        module.eval()
        losses[p, "eval"] = module.loss_fn(module((tokens, positions)), labels).item()  # no key needed
        module.train()
        try:
            module((tokens, positions))
            losses[p, "no key"] = "ran"
        except RuntimeError as e:
            losses[p, "no key"] = str(e)
    return losses


@pytest.mark.timeout(120)
def test_a_gpt_with_dropout_drops_the_same_masks_for_the_same_samples():
    losses = launcher.run(_gpt_losses, 1)[0]
    same, again, other = losses[0.1]
    assert same == again and same != other, "same samples, same masks; other samples, other masks"
    assert len(set(losses[0.0])) == 1 and same != losses[0.0][0], "dropout 0.1 trains another loss than 0"
    assert losses[0.1, "eval"] == losses[0.0, "eval"], "evaluation drops nothing"
    assert losses[0.0, "no key"] == "ran"
    assert "seqpipe_ds.model.dropout.samples" in losses[0.1, "no key"]


def test_bad_probabilities_are_rejected():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            dropout.HiddenDropout(p, stream=0)
        for field in ("hidden_dropout", "attention_dropout"):
            with pytest.raises(ValueError, match=f"{field} {p} is not in \\[0, 1\\)"):
                tiny_config(**{field: p}).check_options()


def _attention_dropout_keep_rates(p):
    """Kept fraction of the attention weights, whole and sliced: q = k = 0 gives uniform weights,
    and v = identity over the key positions reads every weight back."""
    from seqpipe_ds import parallel
    from seqpipe_ds.attention import KVCache, attend
    parallel.initialize()
    torch.manual_seed(0)
    b, heads, seq = 4, 4, 64
    allowed = seq * (seq + 1) // 2 * b * heads  # causal weights
    q = torch.zeros(b, heads, seq, seq)
    v = torch.eye(seq).expand(b, heads, seq, seq)
    whole = int((attend(q, q, v, None, 0, dropout=p) != 0).sum())
    cache, kept = KVCache(), 0
    for j, (a, e) in enumerate([(0, 24), (24, 40), (40, 64)]):
        with cache.slice(j):
            kept += int((attend(q[:, :, a:e], q[:, :, a:e], v[:, :, a:e], cache, 0, dropout=p) != 0).sum())
    return whole, kept, allowed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_attention_dropout_keeps_one_minus_p(p):
    whole, sliced, allowed = launcher.run(_attention_dropout_keep_rates, 1, p=p)[0]
    _assert_rate(whole, allowed, 1 - p, "attention weights kept, whole sequence")
    _assert_rate(sliced, allowed, 1 - p, "attention weights kept, 3 slices")


def _initialize_warnings(attention_dropout):
    import seqpipe_ds
    from seqpipe_ds import parallel
    from seqpipe_ds.model import gpt_pipeline
    model = gpt_pipeline(tiny_config(attention_dropout=attention_dropout, hidden_dropout=0.1), parallel.initialize())
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
              "seqpipe": {"enabled": True, "seq_length": 16, "seq_slices": 2}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seqpipe_ds.initialize(model=model, model_parameters=model.parameters(), config=config)
    return [str(w.message) for w in caught if "seqpipe_ds" in str(w.message)]


@pytest.mark.timeout(400)
def test_attention_dropout_gets_one_notice_at_start():
    noticed = launcher.run(_initialize_warnings, 1, attention_dropout=0.1)[0]
    assert len(noticed) == 1
    for words in ("--attention-dropout 0.1", "NOT those of the unsliced step", "log-sum-exp", "take no dropout mask"):
        assert words in noticed[0]
    assert launcher.run(_initialize_warnings, 1, attention_dropout=0.0)[0] == []
