"""The second example plugin package (examples/beitdist-masked-pixels), installed for real with pip
and pretrained through `beitdist launch` with no change to beitdist.

Installed like tests/test_example_plugin.py's example: offline into a private `--target` directory
that only this module's subprocesses see (PYTHONPATH; `beitdist launch` hands it on to its Ray
workers). One launch of the package's own recipe (2 Ray workers, DeepSpeed ZeRO-2, the bundled
digits) is judged from what it wrote: the loss falls, the evaluation scored masked patches, the
head drew its pictures, and the final weights load back with `head="auto"` and reproduce the run's
last evaluation on the same validation batches (same masks: the pipeline draws them from the
recipe's seed and the sample index).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_example_plugin import _env, installed_site

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "beitdist-masked-pixels"
RECIPE = PACKAGE / "recipes" / "digits_masked_pixels.yaml"


@pytest.fixture(scope="module")
def pixels_site(tmp_path_factory):
    """The directory the package is pip-installed into."""
    yield from installed_site(PACKAGE, tmp_path_factory, "masked_pixels")


def _python(code: str, *args: str, env: dict[str, str], cwd: Path) -> dict:
    """Run `code` in a fresh interpreter; its last stdout line is JSON."""
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False,
                            cwd=cwd, timeout=180)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


REEVALUATE = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import torch

    import beitdist
    from beitdist.data.pipeline import build_loaders
    from beitdist.recipe import load_recipe

    run_dir, recipe = Path(sys.argv[1]), load_recipe(sys.argv[2])
    world = json.loads((run_dir / "train_result.json").read_text())["world_size"]
    model = beitdist.load_model(run_dir / "final", head="auto")
    head, backbone = model.head, recipe.model.backbone_config()
    totals = {}
    with torch.no_grad():
        for rank in range(world):  # every rank's validation shard, as the run evaluated them
            _, val = build_loaders(recipe.data, recipe.head.name, backbone.image_size[0], backbone.patch_size,
                                   rank=rank, world_size=world, seed=recipe.seed)
            for batch in val:
                out = head.evaluate_batch(model, batch, recipe.train.eval_mode)
                for key, value in head.metric_state(out, batch).items():
                    totals[key] = totals.get(key, 0) + value.double()
    print(json.dumps({"head": type(head).__qualname__, "module": type(head).__module__, "name": model.head_name,
                      "options": head.options(), "training": model.training, **head.compute_metrics(totals)}))
    """
)


def test_launch_pretrains_on_digits_and_the_final_weights_load_back_with_head_auto(pixels_site, tmp_path):
    env = _env(pixels_site, RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    start = time.monotonic()
    launch = subprocess.run([sys.executable, "-m", "beitdist", "launch", str(RECIPE)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=400, check=False)
    launch_s = time.monotonic() - start
    output = launch.stdout + launch.stderr
    assert launch.returncode == 0, output[-8000:]

    run_dir = tmp_path / "runs" / "digits_masked_pixels"
    result = json.loads((run_dir / "train_result.json").read_text())
    losses, metrics = result["losses"], result["metrics"]
    assert result["world_size"] == 2 and len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, losses  # measured: 1.25 -> 0.95

    # the batches carried the mask: only masked patches are scored, and there were some
    assert metrics["val_masked_patches"] > 0 and 0.2 < metrics["val_mask_ratio"] < 0.6, metrics
    assert 0.0 < metrics["val_pixel_mse"] < first, metrics
    # the head's pictures went to MLflow: input | masked | reconstruction
    assert sorted(p.name for p in run_dir.glob("mlartifacts/*/artifacts/pictures/*.png"))[:1] == ["pixels_0.png"]

    again = _python(REEVALUATE, str(run_dir), str(RECIPE), env=_env(pixels_site), cwd=tmp_path)
    assert (again["module"], again["head"], again["name"]) == ("beitdist_masked_pixels.head", "PixelRegressionHead",
                                                              "pixel_regression")
    assert again["options"] == {"norm_pix": True, "decoder": "linear"} and again["training"] is False
    assert again["masked_patches"] == metrics["val_masked_patches"]  # the same masks
    assert again["pixel_mse"] == pytest.approx(metrics["val_pixel_mse"], rel=1e-4)
    print(f"\nlaunch {launch_s:.0f} s; loss first5 {first:.4f} last5 {last:.4f}; val_pixel_mse "
          f"{metrics['val_pixel_mse']:.6f}, reloaded {again['pixel_mse']:.6f}; masked {again['masked_patches']:.0f}")


SIMMIM_CHECKPOINT = textwrap.dedent(
    """
    import json
    import sys

    import torch

    import beitdist

    config = beitdist.BackboneConfig(embed_dim=32, depth=2, num_heads=2, image_size=16, patch_size=4)
    model = beitdist.build_model(config, "pixel_regression", {"decoder": "pixel_shuffle"})
    # a SimMIM-style state dict: the encoder under `encoder.`, its final norm and the decoder at the top
    raw = {("encoder." + k.removeprefix("backbone.")) if k.startswith("backbone.") else k.removeprefix("head."): v
           for k, v in model.state_dict().items()}
    torch.save(raw, sys.argv[1])
    loaded = beitdist.load_model(sys.argv[1], head="auto")
    same = all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    print(json.dumps({"name": loaded.head_name, "options": loaded.head.options(), "same": same,
                      "keys": sorted(k for k in raw if not k.startswith("encoder."))}))
    """
)


def test_a_simmim_style_checkpoint_is_recognised_by_its_decoder_keys(pixels_site, tmp_path):
    out = _python(SIMMIM_CHECKPOINT, str(tmp_path / "simmim.pth"), env=_env(pixels_site), cwd=tmp_path)
    assert out["keys"] == ["decoder.0.bias", "decoder.0.weight", "norm.bias", "norm.weight"]
    assert out["name"] == "pixel_regression" and out["options"]["decoder"] == "pixel_shuffle" and out["same"]
