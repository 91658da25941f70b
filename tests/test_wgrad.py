"""The B/W split of the model's linear layers (seqpipe_ds/model/wgrad.py): a backward under
``wgrad.deferring`` followed by ``queue.run()`` gives the plain backward's gradients.

Why equality is exact where it is asserted exact: under ``deferring`` the input gradient is the plain
backward's GEMM (and collective) on the same operands, the bias gradient the same reduction, and
``run()`` computes each weight gradient with the plain backward's GEMM on the same operands and adds
it to ``.grad`` with one autograd accumulation, as the plain backward does. Within one unit each
weight gets one deferred term, and the tied word embedding two (the head's, deferred, and the
embedding's, in B), whose sum is commutative; so one unit is bit-identical, in float64 and bf16.

Several units (sequence slices) whose W run in another order than their backwards add the same terms
in another order. Summing n terms in any order in floating point, each partial sum is rounded once,
so each order is within (n - 1) u sum_i |g_i| of the exact sum (u: the dtype's unit roundoff) and the
two orders are within 2 (n - 1) u sum_i |g_i| of each other, elementwise. That bound is asserted,
with g_i the queued terms themselves; parameters whose gradients stay in B keep their order and stay
bit-identical.
"""
import contextlib

import pytest
import torch

import launcher
from common import make_batch, tiny_config

BATCH, SEQ = 2, 16
SLICES = [6, 2, 8]  # even, so that they split over TP 2 under sequence parallelism
DEFERRED = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight",
            "output_layer.weight")


def _samples():
    from seqpipe_ds.model import dropout
    return dropout.samples(dropout.Samples(seed=3, numbers=torch.arange(BATCH)))


def _model(tp, dtype=torch.float64, **options):
    from seqpipe_ds import parallel
    from seqpipe_ds.model import gpt_pipeline
    config = tiny_config(params_dtype=dtype, hidden_dropout=0.1, **options)
    return gpt_pipeline(config, parallel.initialize(tensor_parallel_size=tp), seed=7)


def _forward(module, inputs, labels, normalizer=None):
    """The embedding's output, the detached input of the rest of the stage (whose gradient is the
    stage's input gradient), and the loss."""
    funcs = module.forward_funcs
    first = funcs[0](inputs)
    x = first.detach().requires_grad_()
    hidden = x
    for func in funcs[1:]:
        hidden = func(hidden)
    return first, x, module.loss_fn(hidden, labels, normalizer)


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _is_deferred(name, tied):
    return name.endswith(DEFERRED) or (tied and name.endswith("word_embeddings.weight"))


def _unit(module, batch, defer):
    """One unit's backward, plain or B then W: (input gradient, gradients, problems seen on the way)."""
    from seqpipe_ds.model import wgrad
    module.zero_grad(set_to_none=True)
    with _samples():
        first, x, loss = _forward(module, *batch)
    problems = []
    if not defer:
        loss.backward()
        first.backward(x.grad)
        return x.grad, _grads(module), problems
    queue = wgrad.WeightGrads()
    with wgrad.deferring(queue):
        loss.backward()
    tied = not module.gpt_config.untie_embeddings_and_output_weights
    embedding = {id(p) for p in module.forward_funcs[0].parameters()}  # its backward has not run yet
    layers = module.gpt_config.num_layers
    missing = {n for n, p in module.named_parameters() if p.grad is None}
    expected = {n for n, p in module.named_parameters() if _is_deferred(n, tied) or id(p) in embedding}
    if missing != expected:
        problems.append(f"without a gradient before W: {sorted(missing ^ expected)} differ")
    if len(queue) != 4 * layers + 1:
        problems.append(f"{len(queue)} queued weight gradients, expected {4 * layers + 1}")
    if queue.nbytes <= 0:
        problems.append("queue holds no bytes")
    first.backward(x.grad)
    queue.run()
    if len(queue) or queue.nbytes:
        problems.append(f"queue not empty after run: {len(queue)} items, {queue.nbytes} bytes")
    return x.grad, _grads(module), problems


def _compare_unit(module, batch):
    plain_dx, plain, _ = _unit(module, batch, defer=False)
    dx, grads, problems = _unit(module, batch, defer=True)
    if not torch.equal(dx, plain_dx):
        problems.append(f"input gradient differs by {(dx - plain_dx).abs().max().item()}")
    problems += [f"{n} differs by {(grads[n] - g).abs().max().item()}" for n, g in plain.items()
                 if not torch.equal(grads[n], g)]
    return problems


def _sliced(module, batch, lengths, defer):
    """Slices of one micro-batch as units (the KV cache carries K/V and their gradients between them):
    backwards in reverse slice order; deferred, each slice's W in its own queue, run in slice order
    afterwards. Returns (input gradients, gradients, queues' terms summed in absolute value)."""
    from seqpipe_ds.attention import KVCache
    from seqpipe_ds.model import wgrad
    module.zero_grad(set_to_none=True)
    normalizer = module.loss_fn.normalizer(batch[1])
    parts = [tuple(tuple(t.split(lengths, dim=1)[j] for t in group) for group in batch) for j in range(len(lengths))]
    cache = KVCache(capacity=module.gpt_config.max_position_embeddings)
    units = []
    for j, (inputs, labels) in enumerate(parts):
        with cache.slice(j), _samples():
            units.append(_forward(module, inputs, labels, normalizer))
    queues, dxs = [wgrad.WeightGrads() for _ in lengths], {}
    for j in reversed(range(len(lengths))):
        first, x, loss = units[j]
        with wgrad.deferring(queues[j]) if defer else contextlib.nullcontext():
            torch.autograd.backward(*cache.backward_args(j, [loss], [None]))
        cache.release(j)
        first.backward(x.grad)
        dxs[j] = x.grad
    magnitude = {}
    for queue in queues:
        for item in queue._queue:
            term = item.grad_output.t().matmul(item.total_input()).abs()
            magnitude[id(item.weight)] = magnitude.get(id(item.weight), 0) + term
        queue.run()
    return dxs, _grads(module), magnitude


def _compare_sliced(module, batch, lengths=SLICES):
    plain_dx, plain, _ = _sliced(module, batch, lengths, defer=False)
    dx, grads, magnitude = _sliced(module, batch, lengths, defer=True)
    u = torch.finfo(module.gpt_config.params_dtype).eps / 2
    bound = 2 * (len(lengths) - 1) * u
    problems = [f"input gradient of slice {j} differs" for j in dx if not torch.equal(dx[j], plain_dx[j])]
    worst = 0.0
    for n, p in module.named_parameters():
        if id(p) not in magnitude:  # all B: same terms in the same order
            if not torch.equal(grads[n], plain[n]):
                problems.append(f"{n} (all B) differs")
            continue
        diff = (grads[n] - plain[n]).abs()
        if not bool((diff <= bound * magnitude[id(p)]).all()):
            problems.append(f"{n}: {diff.max().item()} above the reordering bound")
        worst = max(worst, ((grads[n] - plain[n]).norm() / plain[n].norm()).item())
    return problems, worst


def _hooks(module, batch):
    """Hooks registered on a deferred weight fire with its gradient when its W runs. In B autograd
    calls them too, with no gradient (None), as for any function that returns none for a weight."""
    from seqpipe_ds.model import wgrad
    weight = module.forward_funcs[1].mlp.linear_fc1.weight
    fired = []
    weight.register_hook(lambda grad: fired.append(("hook", grad if grad is None else grad.clone())))
    weight.register_post_accumulate_grad_hook(lambda p: fired.append(("post", p.grad if p.grad is None
                                                                      else p.grad.clone())))
    module.zero_grad(set_to_none=True)
    queue = wgrad.WeightGrads()
    with _samples():
        first, x, loss = _forward(module, *batch)
    with wgrad.deferring(queue):
        loss.backward()
    in_b = [(kind, grad is None) for kind, grad in fired]
    del fired[:]
    queue.run()
    return dict(in_b=in_b, in_w=[kind for kind, _ in fired], same=all(torch.equal(g, weight.grad) for _, g in fired))


def _other_thread(module, batch):
    """A backward on another thread than the one inside ``deferring`` queues too (on a GPU autograd
    runs it on a device thread, where the caller's ContextVars are not set): how many it queued."""
    import threading

    from seqpipe_ds.model import wgrad
    module.zero_grad(set_to_none=True)
    with _samples():
        _, _, loss = _forward(module, *batch)
    queue = wgrad.WeightGrads()
    with wgrad.deferring(queue):
        thread = threading.Thread(target=loss.backward)
        thread.start()
        thread.join()
    return len(queue)


def _outside_deferring():
    """An installed layer outside ``deferring`` is megatron-core's, bit for bit; with gradient
    accumulation fusion (a stand-in for the CUDA kernel) W adds into main_grad as megatron does."""
    import types

    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import layers as mcore_layers

    from seqpipe_ds import parallel
    from seqpipe_ds.model import wgrad
    parallel.initialize()
    torch.manual_seed(0)
    config = tiny_config().parallel_config()

    def make():  # the same weights every time
        made = tensor_parallel.ColumnParallelLinear(8, 6, config=config, init_method=torch.nn.init.normal_,
                                                    bias=True, gather_output=False)
        with torch.no_grad():
            made.weight.copy_(torch.linspace(-1, 1, 48).view(6, 8))
            made.bias.copy_(torch.linspace(0, 1, 6))
        return made
    plain, installed = make(), wgrad.install(make())
    x = torch.randn(5, 2, 8, requires_grad=True)
    out = {}
    for name, layer in (("plain", plain), ("installed", installed)):
        y, _ = layer(x)
        dx, = torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)
        y.backward(torch.ones_like(y))
        out[name] = dx, layer.weight.grad.clone(), layer.bias.grad.clone()
    identical = all(torch.equal(a, b) for a, b in zip(out["plain"], out["installed"]))

    kernel = getattr(mcore_layers, "fused_weight_gradient_mlp_cuda", None)
    mcore_layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
        wgrad_gemm_accum_fp32=lambda total_input, grad_output, main_grad: main_grad.add_(
            grad_output.t().matmul(total_input)))
    fused = {}
    for name in ("plain", "deferred"):
        layer = wgrad.install(make())
        layer.gradient_accumulation_fusion = True
        layer.weight.main_grad = torch.ones_like(layer.weight)
        layer.weight.grad_added_to_main_grad = False
        hooked = []
        layer.weight.register_hook(lambda g: hooked.append(g is not None))
        queue = wgrad.WeightGrads()
        y, _ = layer(x)
        with wgrad.deferring(queue) if name == "deferred" else contextlib.nullcontext():
            y.backward(torch.ones_like(y))
        queued = len(queue)
        queue.run()
        fused[name] = layer.weight.main_grad.clone(), sum(hooked), layer.weight.grad_added_to_main_grad, queued
    mcore_layers.fused_weight_gradient_mlp_cuda = kernel
    return dict(identical=identical, fused=fused)


def check_all(tp, sequence_parallel):
    """Every check of one layout, in one launch."""
    result = {}
    opts = dict(sequence_parallel=sequence_parallel)
    batch = make_batch(BATCH, SEQ, tiny_config().vocab_size, seed=3)
    for granularity in (None, "full", "selective"):
        result["unit", granularity] = _compare_unit(_model(tp, recompute_granularity=granularity, **opts), batch)
    result["unit", "untied"] = _compare_unit(_model(tp, untie_embeddings_and_output_weights=True, **opts), batch)
    for granularity in (None, "full", "selective"):
        module = _model(tp, untie_embeddings_and_output_weights=True, recompute_granularity=granularity, **opts)
        result["sliced", granularity] = _compare_sliced(module, batch)
    if tp == 1:
        module = _model(tp, untie_embeddings_and_output_weights=True)
        result["hooks"] = _hooks(module, batch)
        result["other thread"] = _other_thread(module, batch)
        module = _model(tp, torch.bfloat16, untie_embeddings_and_output_weights=True, swiglu=True,
                        add_bias_linear=False)
        result["bf16 unit"] = _compare_unit(module, batch)
        result["bf16 sliced"] = _compare_sliced(module, batch)
        result["outside"] = _outside_deferring()
    return result


@pytest.fixture(scope="module")
def tp1():
    return [launcher.run(check_all, 1, timeout=300, tp=1, sequence_parallel=False)[0]]


@pytest.fixture(scope="module")
def tp2():
    return launcher.run(check_all, 2, timeout=360, tp=2, sequence_parallel=False)


@pytest.fixture(scope="module")
def tp2_sp():
    return launcher.run(check_all, 2, timeout=360, tp=2, sequence_parallel=True)


def _assert_layout(ranks):
    for rank, result in enumerate(ranks):
        for granularity in (None, "full", "selective", "untied"):
            assert result["unit", granularity] == [], (rank, granularity)
        for granularity in (None, "full", "selective"):
            problems, worst = result["sliced", granularity]
            assert problems == [], (rank, granularity)
            assert worst <= 1e-12, (rank, granularity, worst)


@pytest.mark.timeout(360)
def test_single_process_float64(tp1):
    _assert_layout(tp1)


@pytest.mark.timeout(420)
def test_tensor_parallel(tp2):
    _assert_layout(tp2)


@pytest.mark.timeout(420)
def test_tensor_and_sequence_parallel(tp2_sp):
    _assert_layout(tp2_sp)


@pytest.mark.timeout(360)
def test_bf16(tp1):
    result = tp1[0]
    assert result["bf16 unit"] == []
    problems, _ = result["bf16 sliced"]
    assert problems == []


@pytest.mark.timeout(360)
def test_hooks_fire_with_the_gradient_when_w_runs(tp1):
    hooks = tp1[0]["hooks"]
    assert hooks == dict(in_b=[("hook", True), ("post", True)], in_w=["hook", "post"], same=True)


@pytest.mark.timeout(360)
def test_a_backward_on_another_thread_queues(tp1):
    assert tp1[0]["other thread"] == 4 * tiny_config().num_layers + 1


@pytest.mark.timeout(360)
def test_outside_deferring_is_megatron_and_fusion_adds_into_main_grad(tp1):
    outside = tp1[0]["outside"]
    assert outside["identical"]
    (plain_grad, plain_hooks, plain_added, _), (grad, hooks, added, queued) = outside["fused"].values()
    assert queued == 1 and torch.equal(grad, plain_grad) and not torch.equal(grad, torch.ones_like(grad))
    assert (hooks, added) == (plain_hooks, plain_added) == (1, True)


def test_backward_split_problems_names_unmarked_layers():
    from deepspeed.pipe import LayerSpec

    from seqpipe_ds import protocol
    from seqpipe_ds.model.gpt import gpt_layer_specs

    class Plain(torch.nn.Module):
        pass
    for untied in (False, True):
        specs = gpt_layer_specs(tiny_config(untie_embeddings_and_output_weights=untied))
        assert protocol.backward_split_problems(specs) == []
    specs.insert(2, LayerSpec(Plain))
    assert protocol.backward_split_problems(specs) == [
        "layer 2 (test_backward_split_problems_names_unmarked_layers.<locals>.Plain) is not marked "
        "@seqpipe_ds.splits_backward, so its backward cannot be split into B and a deferred W"]
