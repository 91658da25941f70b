"""Shared fixtures for the numerical tests: a tiny GPT, deterministic batches, comparisons."""
import torch

from seqpipe_ds.model import GPTConfig

TINY = dict(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=128, max_position_embeddings=64)
RTOL = 1e-5
# The exactness matrices' model options and bound: float64 throughout, Megatron's default hidden
# dropout (test_engine_exact.py says why 1e-10 holds on any CPU).
EXACT_MODEL = dict(params_dtype=torch.float64, hidden_dropout=0.1)
RTOL64 = 1e-10


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig(**{**TINY, **overrides})


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    """((tokens, position_ids), (labels, loss_mask)), with some masked-out tokens."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    loss_mask = (torch.rand(batch, seq, generator=g) > 0.1).float()
    positions = torch.arange(seq).expand(batch, seq).contiguous()
    return (data[:, :-1].contiguous(), positions), (data[:, 1:].contiguous(), loss_mask)


def float64(values) -> torch.Tensor:
    """A run's per-step losses (Python floats) as a float64 tensor: torch.tensor's default would
    round them to float32, below which a float64 comparison could not see."""
    return torch.tensor(values, dtype=torch.float64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(actual: dict, expected: dict, rtol: float = RTOL, what: str = ""):
    assert actual.keys() == expected.keys(), f"{what}: different tensors {sorted(actual)} vs {sorted(expected)}"
    worst = {k: rel_err(actual[k], expected[k]) for k in expected}
    bad = {k: e for k, e in worst.items() if not e <= rtol}
    assert not bad, f"{what}: relative error above {rtol}: {bad}"
