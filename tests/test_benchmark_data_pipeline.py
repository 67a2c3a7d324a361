"""Smoke test of benchmarks/data_pipeline.py: tiny data, short budgets, every reader x transform timed."""

from __future__ import annotations

import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "data_pipeline.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_data_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_data_pipeline_benchmark_smoke(tmp_path):
    bench = _load_script()
    out = tmp_path / "results" / "data_pipeline.json"
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--workdir", str(tmp_path / "data"), "--json", str(out), "--dataset-size", "16",
                             "--classes", "2", "--shards", "2", "--seconds", "0.2", "--images", "4", "--warmup", "1",
                             "--rounds", "2", "--workers", "0", "2", "--batch-size", "2"])
    finally:
        torch.set_num_threads(threads)  # main() pins one thread for the single-process rows

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    data = result["data"]
    assert data["images"] == 16 and data["mean_jpeg_kb"] > 1
    assert 224 <= data["short_side_min"] <= data["short_side_max"] <= 512

    # the layouts the readers expect, holding the same 16 images
    folder = tmp_path / "data" / "data_pipeline_images" / "train"
    assert sorted(p.name for p in folder.iterdir()) == ["class0", "class1"]
    assert len(list(folder.glob("*/*.jpg"))) == 16
    shards = sorted((tmp_path / "data" / "data_pipeline_shards").glob("*.tar"))
    names = [name for shard in shards for name in tarfile.open(shard).getnames()]
    assert len(shards) == 2 and len(names) == 32 and names[:2] == ["000000.jpg", "000000.cls"]

    single = {(r["reader"], r["transform"]): r for r in result["rows"] if r["num_workers"] == 0}
    assert set(single) == {(reader, t) for reader in bench.READERS for t in bench.TRANSFORMS}
    in_process = {(r["reader"], r["transform"]) for r in result["rows"] if r["mode"] == "BeitLoader, 0 workers"}
    loaders = {(r["reader"], r["transform"]): r for r in result["rows"] if r["num_workers"] == 2}
    assert in_process == set(loaders) == {(reader, t) for reader in bench.READERS for t in bench.LOADER_TRANSFORMS}
    assert len(result["rows"]) == len(single) + 2 * len(loaders)
    for row in result["rows"]:
        assert row["images"] >= 1 and row["images_per_s"] > 0 and row["images_per_s_per_core"] > 0, row
        assert row["cores_per_gpu"] == result["gpu_images_per_s_assumed"] / row["images_per_s_per_core"]
    for row in loaders.values():
        assert row["images_per_s_per_core"] == row["images_per_s"] / 2
