"""`beitdist export RUN OUT --to onnx`: the model with its head as an ONNX graph, checked.

The graph takes `pixel_values` (batch, 3, H, W) at the model's resolution, with a dynamic batch
axis, and returns `logits` (the head's output: (batch, classes), or (batch, classes, h, w) for
segmentation at the neck's resolution). It is made by torch's TorchScript-based exporter at
opset `ONNX_OPSET`: with torch 2.13 the torch.export-based exporter fails to decompose the
relative-position-bias attention, while the traced graph is exact. Every export is run with
onnxruntime on two batch sizes and compared with PyTorch; a difference above the tolerance fails
the export (nothing is written). `preprocessing.json` beside the graph says how to feed it.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from beitdist.errors import InputError, RunFailedError

log = logging.getLogger(__name__)

ONNX_OPSET = 17
TOLERANCE = 1e-4
CHECK_BATCHES = (2, 3)


@dataclass(frozen=True)
class OnnxCheck:
    """How the exported graph compared with PyTorch."""

    max_abs_diff: float
    batches: tuple[int, ...]
    onnxruntime: str


class _Logits(torch.nn.Module):
    """The model as ONNX sees it: pixels in, the head's logits out."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).logits


def _require_onnx() -> tuple[Any, Any]:
    from beitdist.extras import require

    require("onnx", "beitdist export --to onnx")
    require("onnxruntime", "beitdist export --to onnx")
    import onnx
    import onnxruntime

    return onnx, onnxruntime


def check_graph(path: Path, wrapped: torch.nn.Module, shape: tuple[int, ...]) -> OnnxCheck:
    """Run the graph with onnxruntime on random batches of CHECK_BATCHES images; the largest
    absolute difference from PyTorch over all outputs."""
    _, ort = _require_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for batch in CHECK_BATCHES:
        pixels = torch.randn(batch, *shape, generator=generator)
        with torch.no_grad():
            expected = wrapped(pixels).float().numpy()
        got = session.run(["logits"], {"pixel_values": pixels.numpy()})[0]
        if got.shape != expected.shape:
            raise RunFailedError(f"ONNX graph gives logits of shape {got.shape} for a batch of {batch}, PyTorch "
                                 f"{expected.shape}")
        worst = max(worst, float(abs(got - expected).max()))
    return OnnxCheck(worst, CHECK_BATCHES, ort.__version__)


def export_onnx(model: Any, out_dir: str | Path, *, preprocessing: dict[str, Any], overwrite: bool = False,
                sources: tuple[str, ...] = ()) -> tuple[Path, OnnxCheck]:
    """Write `out_dir` (model.onnx + preprocessing.json) atomically, after the graph passed its
    check against PyTorch; the output rules of `beitdist.output_paths` (nothing is replaced
    without `overwrite`, never a run or another kind of directory)."""
    from beitdist.output_paths import check_output_dir, write_output_dir

    onnx, _ = _require_onnx()
    check_output_dir(out_dir, "onnx", overwrite=overwrite, sources=sources)
    if model.head is None:
        raise InputError("the checkpoint holds a backbone without a head; ONNX export needs a model with a head")
    wrapped = _Logits(model.float()).eval()  # the exporter restores the wrapper's mode, recursively, afterwards
    shape = (model.config.in_chans, *model.config.image_size)
    result: dict[str, OnnxCheck] = {}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        graph = tmp / "model.onnx"
        with warnings.catch_warnings():  # the tracer's notes on shape checks it folds into constants
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (torch.zeros(1, *shape),), str(graph), input_names=["pixel_values"],
                              output_names=["logits"], opset_version=ONNX_OPSET, dynamo=False,
                              dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
        onnx.checker.check_model(str(graph))
        check = check_graph(graph, wrapped, shape)
        if not check.max_abs_diff <= TOLERANCE:
            raise RunFailedError(f"the ONNX graph differs from PyTorch by {check.max_abs_diff:.3g} (tolerance "
                                 f"{TOLERANCE:g}); nothing was written")
        result["check"] = check
        record = {**preprocessing, "input": "pixel_values", "input_shape": ["batch", *shape], "output": "logits",
                  "head": model.head_name, "opset": ONNX_OPSET,
                  "checked": {"max_abs_diff": check.max_abs_diff, "batches": list(check.batches),
                              "onnxruntime": check.onnxruntime}}
        (tmp / "preprocessing.json").write_text(json.dumps(record, indent=1) + "\n")

    out = write_output_dir(out_dir, "onnx", write, overwrite=overwrite, sources=sources)
    return out, result["check"]


def preprocessing_of(source: str, model: Any) -> dict[str, Any]:
    """How to feed the graph: the processor the model is evaluated with and its class names."""
    from beitdist.predict import predictor_for

    predictor = predictor_for(source, model) if model.head is not None and model.head.prediction else None
    if predictor is None:
        from beitdist.data.pipeline import AugmentConfig
        from beitdist.data.presets import eval_processor

        processor, labels = eval_processor(model.config.image_size[0], AugmentConfig()), None
    else:
        processor, labels = predictor.processor, predictor.labels
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in processor.to_dict().items()}
    return {"image_processor": json.loads(json.dumps(settings, default=str)), "labels": labels}


__all__ = ["ONNX_OPSET", "OnnxCheck", "check_graph", "export_onnx", "preprocessing_of"]
