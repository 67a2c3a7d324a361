"""Shared fixtures: tiny transformers BEiT models with random weights, saved to temp dirs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

logging.getLogger("transformers").setLevel(logging.ERROR)


def hf_config(**overrides):
    """A tiny transformers BeitConfig (dropouts off so outputs are deterministic)."""
    from transformers import BeitConfig

    base = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
        layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        vocab_size=50,
    )
    base.update(overrides)
    return BeitConfig(**base)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and buffer drawn at random, so no zero-initialised piece hides a mismatch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)
    return model.eval()


def save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def images():
    def make(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture(scope="session")
def quickstart_launch(tmp_path_factory):
    """The README's main job, once per session: `beitdist launch recipes/quickstart.yaml` (700
    steps, 2 Ray workers; ~2.5 min on 2 cores) into a temporary output_dir. Returns (run
    directory, the completed process with its console output)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("quickstart")
    done = subprocess.run([sys.executable, "-m", "beitdist", "launch", str(root / "recipes" / "quickstart.yaml"),
                           "--set", f"output_dir={out}"], capture_output=True, text=True, cwd=out, timeout=1200,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out / "quickstart", done
