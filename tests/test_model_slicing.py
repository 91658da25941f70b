"""Slice-by-slice with KV handoff equals the whole sequence (single process and TP=2)."""
import pytest
import torch

import launcher
from common import assert_close, make_batch, tiny_config

SLICINGS = {"one": [24], "uniform": [6, 6, 6, 6], "uneven": [11, 2, 7, 4], "tokens": [1] * 24}


def _build(tp):
    from seqpipe_ds import parallel
    from seqpipe_ds.model import gpt_pipeline
    return gpt_pipeline(tiny_config(), parallel.initialize(tensor_parallel_size=tp), seed=7)


def _split(batch, lengths):
    """Cuts every [b, s] tensor of the batch into sequence slices."""
    return [tuple(tuple(t.split(lengths, dim=1)[j] for t in part) for part in batch) for j in range(len(lengths))]


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _run_whole(module, batch):
    inputs, labels = batch
    logits = module(inputs)
    loss = module.loss_fn(logits, labels)
    loss.backward()
    return logits.detach(), loss.detach(), _grads(module)


def _run_sliced(module, batch, lengths):
    from seqpipe_ds.attention import KVCache
    cache = KVCache(capacity=64)
    normalizer = module.loss_fn.normalizer(batch[1])
    losses, logits = [], []
    for j, (inputs, labels) in enumerate(_split(batch, lengths)):
        with cache.slice(j):
            out = module(inputs)
        logits.append(out.detach())
        losses.append(module.loss_fn(out, labels, normalizer=normalizer))
    for j in reversed(range(len(lengths))):
        torch.autograd.backward(*cache.backward_args(j, [losses[j]], [None]))
        cache.release(j)
    return torch.cat(logits, dim=1), sum(l.detach() for l in losses), _grads(module)


def compare_slicings_tp1():
    return compare_slicings(_build(1))


def compare_slicings(module):
    batch = make_batch(3, 24, 128, seed=1)
    whole = _run_whole(module, batch)
    out = {}
    for name, lengths in SLICINGS.items():
        module.zero_grad(set_to_none=True)
        out[name] = _run_sliced(module, batch, lengths)
    return whole, out


@pytest.mark.timeout(120)
def test_slices_equal_whole_sequence():
    (logits, loss, grads), sliced = launcher.run(compare_slicings_tp1, 1)[0]
    assert len(grads) > 10
    for name, (s_logits, s_loss, s_grads) in sliced.items():
        assert_close({"logits": s_logits, "loss": s_loss}, {"logits": logits, "loss": loss}, what=name)
        assert_close(s_grads, grads, what=name)
    assert loss.item() > 0


def compare_tp2():
    """TP=2: logits and gradients gathered to full tensors, to compare with TP=1."""
    from megatron.core import parallel_state
    group = parallel_state.get_tensor_model_parallel_group

    def gather(t, dim):
        parts = [torch.empty_like(t) for _ in range(2)]
        torch.distributed.all_gather(parts, t.contiguous(), group=group())
        return torch.cat(parts, dim=dim)

    def full(result):
        logits, loss, grads = result
        return gather(logits, -1), loss, {n: gather(g, params[n].partition_dim)
                                          if getattr(params[n], "tensor_model_parallel", False) else g
                                          for n, g in grads.items()}

    module = _build(2)
    params = dict(module.named_parameters())
    whole, sliced = compare_slicings(module)
    return full(whole), {k: full(v) for k, v in sliced.items()}


@pytest.mark.timeout(180)
def test_tp2_equals_tp1():
    reference = launcher.run(compare_slicings_tp1, 1)[0]
    ranks = launcher.run(compare_tp2, 2)
    (logits, loss, grads), _ = reference
    for (t_whole, t_sliced) in ranks:
        for name, (t_logits, t_loss, t_grads) in [("whole", t_whole), *t_sliced.items()]:
            assert_close({"logits": t_logits, "loss": t_loss}, {"logits": logits, "loss": loss}, what=f"tp2 {name}")
            assert_close(t_grads, grads, what=f"tp2 {name}")
