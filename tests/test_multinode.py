"""Two "nodes" on this machine, launched as on a cluster without ssh: one `deepspeed --hostfile ...
--no_ssh --node_rank K` per node, one pipeline stage each, so stage 0 -> stage 1 traffic crosses the
nodes. The loss curve equals the one-launcher, one-node run exactly.

Where this process may create network namespaces (root, iproute2), each node gets a namespace of
its own joined by a veth pair, with addresses 10.213.47.1 and .2 on an interface named alike on both
(as NICs on cluster nodes): the master address is then not loopback, and GLOO_SOCKET_IFNAME picks the
interface, as the README's cluster section says to. Elsewhere both launchers run on loopback.
"""
import os
import shutil
import subprocess
import time
import uuid
import warnings

import pytest

from test_example import (DEEPSPEED, EVAL, EXAMPLE, LAUNCH_TIMEOUT, PIPELINE, SEQPIPE, TINY_GPT, finish, free_port,
                          launcher_env, read_log, train, write_ds_config)

SUBNET = "10.213.47"  # inside the namespaces only: their routing tables are their own
IFNAME = "spnet"
IP_TIMEOUT = 30


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=IP_TIMEOUT)


def _make_namespaces():
    """Two namespaces with a veth pair between them; returns their names (torn down by the caller)."""
    tag = f"sp{uuid.uuid4().hex[:6]}"  # interface names have 15 characters at most
    names = [f"{tag}n{k}" for k in range(2)]
    created = []
    try:
        for name in names:
            _ip("netns", "add", name)
            created.append(name)
        _ip("link", "add", f"{tag}v0", "type", "veth", "peer", "name", f"{tag}v1")
        for k, name in enumerate(names):
            _ip("link", "set", f"{tag}v{k}", "netns", name)
            _ip("-n", name, "link", "set", f"{tag}v{k}", "name", IFNAME)
            _ip("-n", name, "addr", "add", f"{SUBNET}.{k + 1}/24", "dev", IFNAME)
            _ip("-n", name, "link", "set", IFNAME, "up")
            _ip("-n", name, "link", "set", "lo", "up")
    except BaseException:
        _delete_namespaces(created)
        raise
    return names


def _delete_namespaces(names):
    for name in names:  # deleting a namespace deletes its end of the veth pair, and so the pair
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=IP_TIMEOUT)


def _sent_bytes(namespace):
    out = subprocess.run(["ip", "netns", "exec", namespace, "cat", f"/sys/class/net/{IFNAME}/statistics/tx_bytes"],
                         check=True, capture_output=True, text=True, timeout=IP_TIMEOUT).stdout
    return int(out)


@pytest.fixture
def nodes():
    """Per node: (command prefix, extra environment); the master address; and a function giving the
    bytes each node has sent on its interface (None on loopback)."""
    reason = None
    if os.geteuid() != 0 or shutil.which("ip") is None:
        reason = "needs root and iproute2"
    else:
        try:
            names = _make_namespaces()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            reason = f"`ip` failed: {getattr(error, 'stderr', '') or error}"
    if reason:
        warnings.warn(f"no network namespaces ({reason}): both nodes run on loopback")
        yield [([], {}), ([], {})], "127.0.0.1", lambda: None
        return
    try:
        yield ([(["ip", "netns", "exec", name], {"GLOO_SOCKET_IFNAME": IFNAME}) for name in names], f"{SUBNET}.1",
               lambda: [_sent_bytes(name) for name in names])
    finally:
        _delete_namespaces(names)


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
def test_two_nodes_give_the_loss_curve_of_one_node(nodes, tmp_path):
    per_node, master, sent_bytes = nodes
    one_node, _ = train(tmp_path, "one-node", SEQPIPE, EVAL)

    log = tmp_path / "two-nodes.jsonl"
    config = write_ds_config(tmp_path / "two-nodes.json", SEQPIPE)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    started = time.monotonic()
    procs = []
    for rank, (prefix, env) in enumerate(per_node):
        command = [*prefix, str(DEEPSPEED), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                   "--master_addr", master, "--master_port", port, str(EXAMPLE), *TINY_GPT, *PIPELINE, *EVAL,
                   "--log-file", str(log), "--deepspeed", "--deepspeed_config", str(config)]
        # A session of its own, as test_example.start: on a timeout finish() kills the whole tree.
        procs.append(subprocess.Popen(command, cwd=tmp_path, env={**launcher_env(), **env}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    results = [finish(proc, started + LAUNCH_TIMEOUT) for proc in procs]
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"node {rank} exited with {code}; output ends:\n{out[-4000:]}"
    assert "engine: SeqPipeEngine" in results[0][1]
    # each launcher started one rank of a world of two (global rank = node rank) with this master
    for rank, (_, out) in enumerate(results):
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in out, out[-3000:]
        assert f"--master_addr={master}" in out
    sent = sent_bytes()
    if sent is not None:
        # activations forward, their gradients back, the tied embedding's all-reduce: over the veth pair
        assert all(n > 500_000 for n in sent), f"bytes sent per node: {sent}"

    two_nodes = read_log(log)
    assert sorted(two_nodes["loss"]) == [1, 2, 3, 4] and sorted(two_nodes["valid_loss"]) == [4]
    assert two_nodes == one_node  # exactly: the same ranks compute the same thing, only the wire differs
