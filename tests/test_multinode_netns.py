"""Two "nodes" with their own addresses on one machine: two network namespaces (10.213.0.2 and
10.213.0.3) joined by a bridge in a third, all created by the test and always removed. The
machine's hostname resolves to loopback, as on Debian/Ubuntu, so without beitdist binding the
collectives to each node's interface every rank would advertise 127.x to its peer.

- `beitdist launch --address` on a Ray cluster of one node per namespace (STRICT_SPREAD);
- the same cluster with gloo forced onto loopback on one node: one line naming the addresses tried
  and the variable to set;
- a two-node `torchrun` (one process per namespace, ZeRO-2).
Needs root (network namespaces) and iproute2; skipped otherwise.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.distributed import TINY_RECIPE, merge
from tests.test_multinode import _stop

pytestmark = pytest.mark.slow

HEAD_IP, WORKER_IP = "10.213.0.2", "10.213.0.3"


@dataclass(frozen=True)
class Nodes:
    head: str
    worker: str

    def cmd(self, namespace: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", namespace, *args]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    _remove_stale_namespaces()
    tag = f"bdt{os.getpid()}"
    head, worker, bridge = f"{tag}a", f"{tag}b", f"{tag}br"
    try:
        for namespace in (head, worker, bridge):
            _ip("netns", "add", namespace)
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        for namespace, address, side in ((head, HEAD_IP, "a"), (worker, WORKER_IP, "b")):
            inner, outer = f"{tag}{side}0", f"{tag}{side}1"  # created in this test's own namespaces only
            _ip("link", "add", inner, "netns", namespace, "type", "veth", "peer", "name", outer, "netns", bridge)
            _ip("-n", bridge, "link", "set", outer, "master", "br0")
            _ip("-n", bridge, "link", "set", outer, "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inner)
            _ip("-n", namespace, "link", "set", inner, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as err:
        for namespace in (head, worker, bridge):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {getattr(err, 'stderr', err)}")
    try:
        yield Nodes(head, worker)
    finally:
        for namespace in (head, worker, bridge):  # removes the veths and the bridge with them
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def _remove_stale_namespaces() -> None:
    """Namespaces of an earlier run of this test that was killed before its teardown (named after
    its process id, which is gone)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in listed:
        match = re.fullmatch(r"bdt(\d+)(a|b|br)", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SOCKET_IFNAME")}
    return {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _ray(nodes: Nodes, namespace: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    with log.open("w") as out:
        return subprocess.Popen(nodes.cmd(namespace, ray, "start", "--block", "--disable-usage-stats", *args),
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for_nodes(nodes: Nodes, address: str, count: int, env: dict[str, str], timeout: float = 120) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.monotonic() + timeout
    alive = "0"
    while time.monotonic() < deadline:
        out = subprocess.run(nodes.cmd(nodes.head, sys.executable, "-c", probe, address), capture_output=True,
                             text=True, env=env, timeout=120)
        alive = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "0"
        if alive == str(count):
            return
        time.sleep(2)
    raise AssertionError(f"{alive} of {count} Ray nodes came up at {address}")


@pytest.fixture
def cluster(nodes: Nodes, tmp_path: Path) -> Iterator[str]:
    """A Ray head in the first namespace and a node in the second."""
    port = 6379
    address = f"{HEAD_IP}:{port}"
    temp_dir = tempfile.mkdtemp(prefix="raynn_", dir="/tmp")  # short: Ray's socket paths are length-limited
    started: list[subprocess.Popen] = []
    try:
        started.append(_ray(nodes, nodes.head, ["--head", f"--port={port}", f"--node-ip-address={HEAD_IP}",
                                                "--num-cpus=1", "--include-dashboard=false",
                                                f"--temp-dir={temp_dir}"], _env(), tmp_path / "head.log"))
        _wait_for_nodes(nodes, address, 1, _env())
        started.append(_ray(nodes, nodes.worker, [f"--address={address}", f"--node-ip-address={WORKER_IP}",
                                                  "--num-cpus=1"], _env(),
                            tmp_path / "worker.log"))
        _wait_for_nodes(nodes, address, 2, _env())
        yield address
    finally:
        for node in reversed(started):
            _stop(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _recipe(tmp_path: Path, name: str, **extra: object) -> Path:
    recipe = merge(TINY_RECIPE, {"name": name, "output_dir": str(tmp_path / "runs"),
                                 "train": {"steps": 12, "log_every": 1}, **extra})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


LAUNCH = {"scaling": {"num_workers": 2, "placement_strategy": "STRICT_SPREAD", "resources_per_worker": {"CPU": 1},
                      "max_failures": 0},
          "engine": {"zero_stage": 2}}


def test_launch_across_two_addresses(nodes: Nodes, cluster: str, tmp_path: Path) -> None:
    path = _recipe(tmp_path, "spread", **LAUNCH, optim={"lr": 5e-3}, data={"batch_size": 32},
                   train={"steps": 30, "log_every": 10})
    out = subprocess.run(nodes.cmd(nodes.head, sys.executable, "-m", "beitdist", "launch", str(path),
                                   "--address", cluster), capture_output=True, text=True, cwd=tmp_path,
                         env=_env(), timeout=600)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-6000:])
    run_dir = tmp_path / "runs/spread"
    records = [json.loads((run_dir / "workers" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert {r["node_ip"] for r in records} == {HEAD_IP, WORKER_IP}, records
    losses = json.loads((run_dir / "train_result.json").read_text())["losses"]
    assert len(losses) == 30 and all(map(math.isfinite, losses)) and sum(losses[-5:]) < sum(losses[:5]) - 0.1, losses
    from beitdist import load_model

    assert load_model(run_dir, head="auto").head_name == "classification"


def _torchrun_on_both(nodes: Nodes, path: Path, cwd: Path, worker_env: dict[str, str]) -> list[tuple[int, str]]:
    """One torchrun per namespace (one process each, static rendezvous at the head's address)."""
    port = "29517"
    procs = []
    for rank, namespace in enumerate((nodes.head, nodes.worker)):
        procs.append(subprocess.Popen(
            nodes.cmd(namespace, sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                      f"--node-rank={rank}", f"--master-addr={HEAD_IP}", f"--master-port={port}",
                      "-m", "beitdist", "-v", "train", str(path)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
            env=_env(**(worker_env if rank else {})), start_new_session=True))
    outputs: list[str] = ["", ""]
    try:
        outputs[1] = procs[1].communicate(timeout=300)[0]
        # a node that gave up leaves the other waiting for it (until the process-group timeout)
        outputs[0] = procs[0].communicate(timeout=300 if procs[1].returncode == 0 else 20)[0]
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:  # torchrun and its rank: the session each was started in
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                outputs[procs.index(proc)] = proc.communicate()[0]
    return [(proc.returncode, out) for proc, out in zip(procs, outputs)]


def test_torchrun_across_two_addresses(nodes: Nodes, tmp_path: Path) -> None:
    """Without beitdist choosing the interface, this run hangs in gloo's connect until the
    process-group timeout (both ranks advertise 127.0.0.1: checked by hand when this was written)."""
    path = _recipe(tmp_path, "torchrun2", engine={"zero_stage": 2})
    done = _torchrun_on_both(nodes, path, tmp_path, {})
    assert [code for code, _ in done] == [0, 0], [out[-3000:] for _, out in done]
    result = json.loads((tmp_path / "runs/torchrun2/train_result.json").read_text())
    assert result["world_size"] == 2 and len(result["losses"]) == 12
    weights = load_file(str(tmp_path / "runs/torchrun2/final/model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_node_forced_onto_loopback_ends_in_one_line_at_once(nodes: Nodes, tmp_path: Path) -> None:
    """GLOO_SOCKET_IFNAME=lo on the second node (a variable the user set is kept): its rank could
    never be reached, so it stops before connecting with one line naming the variable, instead of
    gloo retrying until the process-group timeout. (The first node still waits for it until the
    timeout: static rendezvous has no way to hear that a peer gave up.)"""
    path = _recipe(tmp_path, "loopback", engine={"zero_stage": 2})
    start = time.monotonic()
    _, (worker_code, worker_out) = _torchrun_on_both(nodes, path, tmp_path, {"GLOO_SOCKET_IFNAME": "lo"})
    assert worker_code != 0 and time.monotonic() - start < 120
    lines = [line for line in worker_out.splitlines() if line.startswith("beitdist train: run failed")]
    assert len(lines) == 1, worker_out[-4000:]
    assert ("the ranks could not connect to each other: this run spans nodes (1 of 2 ranks here) but "
            "GLOO_SOCKET_IFNAME=lo is a loopback interface") in lines[0]


def test_nodes_without_a_shared_file_system_resume_elastically_from_the_store(nodes: Nodes, tmp_path: Path) -> None:
    """The object-store case across two addresses, each node with its own staging cache: node A
    trains alone up to a checkpoint at step 3 (stop_at), then both nodes resume it on 2 ranks.
    Each node downloads the checkpoint, converts it to a universal one itself (another world
    size), uploads its shards of later checkpoints; rank 0 fetches node B's shards to consolidate.
    The final weights equal those of an uninterrupted 1-rank run (global batch pinned)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    pytest.importorskip("boto3")
    port = 5117
    endpoint = f"http://{HEAD_IP}:{port}"
    server = subprocess.Popen(nodes.cmd(nodes.head, sys.executable, "-m", "moto.server", "-H", HEAD_IP, "-p", str(port)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
                   "client_kwargs": {"region_name": "us-east-1"}}
        make_bucket = ("import boto3, sys, time, json\n"
                       "o = json.loads(sys.argv[1])\n"
                       "s3 = boto3.client('s3', endpoint_url=o['endpoint_url'], aws_access_key_id='testing', "
                       "aws_secret_access_key='testing', region_name='us-east-1')\n"
                       "for _ in range(150):\n"
                       "    try:\n"
                       "        s3.create_bucket(Bucket='runs-bucket'); break\n"
                       "    except Exception as err: error = err; time.sleep(0.2)\n"
                       "else: sys.exit(f'no S3 server: {error!r}')\n")
        subprocess.run(nodes.cmd(nodes.head, sys.executable, "-c", make_bucket, json.dumps(options)), check=True,
                       timeout=60)
        base = {"model": {"backbone": {"drop_path_rate": 0.0}}, "engine": {"zero_stage": 2},
                "scaling": {"global_batch_size": 16}, "train": {"steps": 6, "checkpoint_every": 3, "log_every": 1}}
        reference = _recipe(tmp_path, "reference", **base)
        done = subprocess.run([sys.executable, "-m", "beitdist", "train", str(reference)], capture_output=True,
                              text=True, cwd=tmp_path, env=_env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

        remote = _recipe(tmp_path, "remote", **{**base, "output_dir": "s3://runs-bucket/runs",
                                                "storage": {"options": options}})
        cache = {"a": tmp_path / "cache_a", "b": tmp_path / "cache_b"}
        first = subprocess.run(nodes.cmd(nodes.head, sys.executable, "-m", "beitdist", "-v", "train", str(remote),
                                         "--set", "train.stop_at=3", "--set", f"storage.cache_dir={cache['a']}"),
                               capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]
        procs = []
        for rank, (namespace, node) in enumerate(((nodes.head, "a"), (nodes.worker, "b"))):
            procs.append(subprocess.Popen(
                nodes.cmd(namespace, sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                          f"--node-rank={rank}", f"--master-addr={HEAD_IP}", "--master-port=29518",
                          "-m", "beitdist", "-v", "train", str(remote), "--set", f"storage.cache_dir={cache[node]}"),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=_env(),
                start_new_session=True))
        outputs = []
        try:
            for proc in procs:
                outputs.append(proc.communicate(timeout=300)[0])
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outputs]
        assert all("saved by 1 ranks, resuming on 2" in out for out in outputs)  # each node converted its copy
        staged = {node: next(path.rglob("runs/remote")) for node, path in cache.items()}
        kept = sorted(p.name for p in (staged["b"] / "checkpoints").iterdir() if p.is_dir())
        assert kept == ["step_3", "step_6"], kept  # the resume point it downloaded and its newest shards
        assert not (staged["b"] / "final").exists()
        final = load_file(str(staged["a"] / "final/model.safetensors"))
        expected = load_file(str(tmp_path / "runs/reference/final/model.safetensors"))
        assert sorted(final) == sorted(expected)
        for key, value in expected.items():
            torch.testing.assert_close(final[key], value, atol=1e-5, rtol=1e-4, msg=key)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
