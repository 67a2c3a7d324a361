"""A real 2-node Ray cluster on this machine: `ray start --head` and a second `ray start
--address=...` with its own resources, both on 127.0.0.1, sharing the run directory as cluster
storage; `beitdist launch --address` places one worker per node (STRICT_SPREAD).

Each `ray start` runs with `--block` in its own process group, so the test stops exactly the Ray
processes it started (never `ray stop`, which would end every Ray instance on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from beitdist.distributed import free_port
from tests.distributed import TINY_RECIPE, merge

pytestmark = pytest.mark.slow


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    with log.open("w") as out:
        return subprocess.Popen([ray, "start", "--block", "--disable-usage-stats", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(node: subprocess.Popen) -> None:
    """SIGTERM to the group of one `ray start --block` (it stops its own raylet, GCS, workers)."""
    if node.poll() is None:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def _wait_for_nodes(address: str, count: int, env: dict[str, str], timeout: float = 120) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.monotonic() + timeout
    alive = "0"
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True, env=env,
                             timeout=120)
        alive = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "0"
        if alive == str(count):
            return
        time.sleep(2)
    raise AssertionError(f"{alive} of {count} Ray nodes came up at {address}")


def test_launch_on_a_two_node_cluster_puts_one_worker_on_each_node(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir = tempfile.mkdtemp(prefix="ray2n_", dir="/tmp")  # short: Ray's socket paths are length-limited
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(_ray_start(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                 "--resources", json.dumps({"node_a": 1}), "--include-dashboard=false",
                                 f"--temp-dir={temp_dir}"], env, tmp_path / "head.log"))
        _wait_for_nodes(address, 1, env)
        nodes.append(_ray_start([f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                 "--resources", json.dumps({"node_b": 1})], env, tmp_path / "worker.log"))
        _wait_for_nodes(address, 2, env)

        storage = tmp_path / "shared"  # what NFS or an object store is on a real cluster
        recipe = merge(TINY_RECIPE, {"name": "two_nodes", "output_dir": str(storage),
                                     "scaling": {"num_workers": 2, "placement_strategy": "STRICT_SPREAD",
                                                 "resources_per_worker": {"CPU": 1}},
                                     "engine": {"zero_stage": 3}})
        path = tmp_path / "two_nodes.yaml"
        path.write_text(yaml.safe_dump(recipe))
        out = subprocess.run([sys.executable, "-m", "beitdist", "launch", str(path), "--address", address],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-6000:])
        run_dir = storage / "two_nodes"
        result = json.loads((run_dir / "train_result.json").read_text())
        assert result["world_size"] == 2 and result["step"] == TINY_RECIPE["train"]["steps"]
        records = [json.loads((run_dir / "workers" / f"rank_{r}.json").read_text()) for r in (0, 1)]
        assert records[0]["node_id"] != records[1]["node_id"], records  # one worker per node
        assert (run_dir / "final" / "model.safetensors").exists()
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
