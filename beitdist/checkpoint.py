"""`load_model`, `export_hf` and beitdist's own checkpoint directory.

Loading is all-or-nothing: the checkpoint is read, mapped to beitdist keys, adapted to the
requested model (resolution, shared -> per-block tables, new head), and checked key by key and
shape by shape BEFORE any weight is copied. The only keys allowed to differ are the ones the
adaptation itself decided on (a new head, a new pooling norm, a dropped pretraining head), and each
of those is logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from beitdist.backbone.config import BackboneConfig, ConfigError
from beitdist.backbone.convert import (
    HF_BACKBONE_PREFIX,
    CheckpointError,
    StateDict,
    as_data2vec_keys,
    native_to_hf,
    unwrap,
)
from beitdist.backbone.resample import resample_pos_embed, resample_rel_pos_table
from beitdist.formats import LoadedCheckpoint, hf_head_key, read_foreign, transformers_config
from beitdist.model import BeitForTask, build_model
from beitdist.output_paths import check_output_dir, write_output_dir

log = logging.getLogger(__name__)

NATIVE_CONFIG = "beitdist_config.json"
NATIVE_WEIGHTS = "model.safetensors"
TABLE_SUFFIX = "relative_position_bias_table"


# --------------------------------------------------------------------- reading
def _torch_load(path: Path, trust_pickle: bool) -> Any:
    from beitdist.run.checkpoints import load_checkpoint_file

    # unilm's checkpoints carry their argparse Namespace; allowing that one class is safe.
    return load_checkpoint_file(path, trust_pickle, [argparse.Namespace])


def _read_tensors(path: Path, trust_pickle: bool) -> Any:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as err:
            from beitdist.run.checkpoints import corrupt_checkpoint

            raise corrupt_checkpoint(path, err) from None
    return _torch_load(path, trust_pickle)


def read_tensors(path: str | os.PathLike, trust_pickle: bool = False) -> StateDict:
    """The tensors of one checkpoint file (unilm's `{"model": ...}` and similar wrappers removed),
    for readers of other models' files (a tokenizer's); CheckpointError when it cannot be read."""
    path = Path(path)
    try:
        return unwrap(_read_tensors(path, trust_pickle), str(path))
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(err).__name__}: {err})") from None


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""`microsoft/beit-base-patch16-224`: what a transformers user passes to `from_pretrained`."""


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False, prefer_head: str | None = None
                    ) -> LoadedCheckpoint:
    """Any supported checkpoint -> beitdist keys plus the config it implies. `prefer_head` (the
    head about to be built) decides when a foreign checkpoint's head keys fit several heads."""
    path = Path(path)
    if not path.exists():
        if HUB_ID.fullmatch(str(path)):
            raise CheckpointError(
                f"{path}: no such file or directory (if it is a Hugging Face Hub id: beitdist reads local files "
                f"only and never downloads; fetch it first, e.g. `huggingface-cli download {path} --local-dir DIR`, "
                f"and pass DIR)")
        raise CheckpointError(f"{path}: no such file or directory")
    try:
        if path.is_dir():
            return _read_directory(path, trust_pickle, prefer_head)
        raw = unwrap(_read_tensors(path, trust_pickle), str(path))
    except (OSError, RuntimeError, EOFError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(err).__name__}: {err})") from None
    return read_foreign(raw, None, str(path), prefer_head)


def _read_directory(path: Path, trust_pickle: bool, prefer_head: str | None = None) -> LoadedCheckpoint:
    if (path / NATIVE_CONFIG).exists():
        meta = json.loads((path / NATIVE_CONFIG).read_text())
        state = _read_tensors(path / NATIVE_WEIGHTS, trust_pickle=False)
        try:
            config = BackboneConfig.from_dict(meta["backbone"])
        except (KeyError, TypeError, ConfigError) as err:
            raise CheckpointError(f"{path / NATIVE_CONFIG}: invalid beitdist config ({err})") from None
        return LoadedCheckpoint(state, config, meta.get("head"), meta.get("head_options", {}), str(path), "beitdist")
    if (path / "config.json").exists():
        hf = json.loads((path / "config.json").read_text())
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                raw = unwrap(_read_tensors(path / name, trust_pickle), str(path / name))
                return read_foreign(raw, hf, str(path), prefer_head)
        raise CheckpointError(f"{path}: config.json found but no model.safetensors or pytorch_model.bin")
    training = _training_checkpoint(path, trust_pickle)
    if training is not None:
        return training
    raise CheckpointError(
        f"{path}: a directory, but neither a beitdist checkpoint ({NATIVE_CONFIG}), a transformers one "
        "(config.json), nor a training run / DeepSpeed checkpoint (checkpoints/step_N with beitdist_state.json)"
    )


def _training_checkpoint(path: Path, trust_pickle: bool) -> LoadedCheckpoint | None:
    """A run directory (its `final/`, else its newest complete checkpoint), a run's `checkpoints/`
    directory, or one DeepSpeed tag directory: ZeRO shards consolidated to fp32 weights, with the
    model described by the recipe saved beside them. Evaluating a DeepSpeed checkpoint needs no
    DeepSpeed engine and no recipe file. The engine's files are unpickled weights-only unless
    `trust_pickle` (a run directory may come from anyone)."""
    from beitdist.run.rundir import RunDir

    run = RunDir(path)
    if (run.final / NATIVE_CONFIG).exists():
        return _read_directory(run.final, trust_pickle)
    if (path / RunDir.STATE_FILE).exists():
        ckpt_dir, tag = path.parent, path.name
    else:
        ckpt_dir = run.checkpoints if run.checkpoints.is_dir() else path
        from beitdist.run.checkpoints import complete_tags

        tags = complete_tags(ckpt_dir)
        if not tags:
            return None
        ckpt_dir, tag = ckpt_dir, tags[0]
    from beitdist.recipe import HeadSection, ModelSection
    from beitdist.run.checkpoints import consolidated_state_dict
    from beitdist.schema import OptionsError, parse

    state_file = ckpt_dir / tag / RunDir.STATE_FILE
    saved = json.loads(state_file.read_text())["recipe"]
    try:  # only the model and head sections matter here (datasets and tokenizers need not be installed)
        model_section = parse(ModelSection, saved.get("model", {}), "model")
        head_section = parse(HeadSection, saved.get("head", {}), "head")
    except OptionsError as err:
        raise CheckpointError(f"{state_file}: the saved recipe does not describe a model ({err})") from None
    log.info("consolidating the ZeRO shards of %s", ckpt_dir / tag)
    state = consolidated_state_dict(ckpt_dir, tag, trust_pickle=trust_pickle)
    model = build_model(model_section.backbone_config(), head_section.name, head_section.options)
    return LoadedCheckpoint(state, model.config, model.head_name, model.head.options() if model.head else {},
                            str(ckpt_dir / tag), "deepspeed")


# --------------------------------------------------------------------- adapting
@dataclass
class _Plan:
    """What adapting a checkpoint to a model decided: keys made fresh, keys dropped, and why."""

    fresh: dict[str, str] = field(default_factory=dict)  # key prefix -> reason
    dropped: dict[str, str] = field(default_factory=dict)

    def is_fresh(self, key: str) -> bool:
        return any(key == p or key.startswith(p) for p in self.fresh)

    def is_dropped(self, key: str) -> bool:
        return any(key == p or key.startswith(p) for p in self.dropped)


def _adapt_backbone(ckpt: LoadedCheckpoint, target: BackboneConfig, plan: _Plan) -> StateDict:
    src = ckpt.config
    state = dict(ckpt.state_dict)
    src_grid, dst_grid = src.grid_size, target.grid_size
    shared_key = "backbone.rel_pos_bias." + TABLE_SUFFIX
    if src.rel_pos_bias == "shared" and target.rel_pos_bias == "per_block":
        table = state.pop(shared_key)
        for i in range(target.depth):
            state[f"backbone.blocks.{i}.attn.{TABLE_SUFFIX}"] = table.clone()
        log.info("copied the shared relative-position table into each of the %d blocks", target.depth)
    elif src.rel_pos_bias != target.rel_pos_bias:
        raise CheckpointError(
            f"{ckpt.source}: relative position bias {src.rel_pos_bias!r} in the checkpoint cannot become "
            f"{target.rel_pos_bias!r} (allowed: the same, or 'shared' -> 'per_block')"
        )
    for key in [k for k in state if k.endswith(TABLE_SUFFIX)]:
        state[key] = resample_rel_pos_table(state[key], src_grid, dst_grid)
    if "backbone.pos_embed" in state:
        state["backbone.pos_embed"] = resample_pos_embed(state["backbone.pos_embed"], src_grid, dst_grid)
    if src_grid != dst_grid:
        log.info("resampled position tables from a %s to a %s patch grid", src_grid, dst_grid)
    if src.pooling != target.pooling:
        for name in ("backbone.norm.", "backbone.fc_norm."):
            plan.dropped[name] = f"pooling changes from {src.pooling!r} to {target.pooling!r}"
            plan.fresh[name] = plan.dropped[name]
    if src.use_mask_token and not target.use_mask_token:
        plan.dropped["backbone.mask_token"] = "the model has no mask token"
    if target.use_mask_token and not src.use_mask_token:
        plan.fresh["backbone.mask_token"] = "the checkpoint has no mask token"
    return state


def _check_against(model: torch.nn.Module, state: StateDict, plan: _Plan, where: str) -> StateDict:
    expected = model.state_dict()
    dropped = [k for k in state if plan.is_dropped(k)]
    state = {k: v for k, v in state.items() if k not in dropped}
    missing = [k for k in expected if k not in state and not plan.is_fresh(k)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched[:8]}")
    if problems:
        raise CheckpointError(f"{where}: does not fit the model: " + "; ".join(problems) + "; nothing was loaded")
    for prefix, reason in plan.dropped.items():
        if any(k.startswith(prefix) for k in dropped):
            log.info("%s: not loading %s: %s", where, prefix.rstrip("."), reason)
    for prefix, reason in plan.fresh.items():
        if any(k.startswith(prefix) and k not in state for k in expected):
            log.info("%s: initialising %s fresh: %s", where, prefix.rstrip("."), reason)
    return state


def load_model(
    path: str | os.PathLike,
    head: str | None = None,
    *,
    head_options: Mapping[str, Any] | None = None,
    new_head: bool = False,
    trust_pickle: bool = False,
    **backbone_overrides: Any,
) -> BeitForTask:
    """Load a unilm .pth, a transformers directory, a timm state dict or a beitdist checkpoint.

    `head` picks the head to build (a registered head's name, built-in or a plugin's, None for the
    bare backbone, or "auto" for the checkpoint's own head, recognised also in a plain
    `torch.save(model.state_dict())`). Another head than the checkpoint's starts fresh
    (fine-tuning from pretraining), which is logged. The checkpoint's own head is loaded with its
    weights; it is replaced by a fresh one only when asked: `head_options` that change its shapes
    (e.g. another `num_classes`) or `new_head=True`, logged at WARNING. Anything else that would
    drop trained head weights is a CheckpointError.
    `backbone_overrides` change the architecture where that is a well-defined adaptation:
    `image_size` (tables and embeddings resampled), `rel_pos_bias="per_block"` from a shared table,
    `drop_path_rate`, `grad_checkpointing`, `pooling`, ...

    The model comes back in eval mode, as transformers' `from_pretrained` returns it; call
    `.train()` before training it in a loop of your own (the Trainer does).
    """
    ckpt = read_checkpoint(path, trust_pickle=trust_pickle, prefer_head=head)
    if head == "auto":
        head = ckpt.head
    try:
        target = ckpt.config.replace(**backbone_overrides)
    except ConfigError as err:
        raise CheckpointError(f"{ckpt.source}: {err}") from None
    options = dict(head_options or {})
    same_head = head is not None and head == ckpt.head
    if same_head:
        options = {**ckpt.head_options, **options}
    model = build_model(target, head, options)
    target = model.config
    plan = _Plan()
    state = _adapt_backbone(ckpt, target, plan)
    head_keys = [k for k in state if k.startswith("head.")]
    model_head = {k: v.shape for k, v in model.state_dict().items() if k.startswith("head.")}
    if head_keys and not same_head:
        plan.dropped["head."] = (f"the checkpoint's {ckpt.head!r} head is not loaded into a new {head!r} head"
                                 if head is not None else f"the checkpoint's {ckpt.head!r} head is left out (head=None)")
    elif same_head:
        changed = sorted(k for k in head_keys if k in model_head and state[k].shape != model_head[k])
        if changed or new_head:
            _replace_trained_head(ckpt, head, changed, state, model_head, bool(head_options) or new_head)
            plan.dropped["head."] = plan.fresh["head."] = f"the trained {head!r} head replaced by a new one, as asked"
    if head is not None and not same_head:
        plan.fresh["head."] = f"new {head!r} head, freshly initialised"
    state = _check_against(model, state, plan, ckpt.source)
    model.load_state_dict(state, strict=False)
    return model.eval()  # as transformers' from_pretrained: no dropout, all-patch MIM logits


def _replace_trained_head(ckpt: LoadedCheckpoint, head: str | None, changed: list[str], state: StateDict,
                          model_head: Mapping[str, torch.Size], asked: bool) -> None:
    """A checkpoint's own trained head is thrown away only on request; say so loudly."""
    what = (f"{changed[0]} {list(state[changed[0]].shape)} -> {list(model_head[changed[0]])}" if changed
            else "same shapes, new_head=True")
    if not asked:
        raise CheckpointError(
            f"{ckpt.source}: its trained {head!r} head does not fit the requested one ({what}); pass head_options "
            "(CLI: --head-option) for a new head of another shape, or new_head=True (--new-head)")
    log.warning("%s: replacing the checkpoint's trained %r head with a freshly initialised one (%s)",
                ckpt.source, head, what)


# --------------------------------------------------------------------- writing
def _tensors_for_saving(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(model: BeitForTask, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """beitdist's own checkpoint: config + head + safetensors weights, written atomically.

    `out_dir` must be new (or empty); an existing beitdist checkpoint is replaced only with
    `overwrite=True`, and anything else there (a run, a run's own weights, other files) is
    refused (`OutputError`)."""
    return _write_native(model, Path(out_dir), overwrite=overwrite, run_owned=False)


def save_run_weights(model: BeitForTask, final_dir: Path, notes: Mapping[str, Any] | None = None) -> Path:
    """A training run writing (or rewriting, on a resumed run) its own consolidated `final/`;
    `notes` (which weights: raw or EMA) go into its beitdist_config.json."""
    return _write_native(model, final_dir, overwrite=True, run_owned=True, notes=notes)


def _write_native(model: BeitForTask, out_dir: Path, *, overwrite: bool, run_owned: bool,
                  notes: Mapping[str, Any] | None = None) -> Path:
    meta = {
        "format": "beitdist",
        "backbone": model.config.to_dict(),
        "head": model.head_name,
        "head_options": model.head.options() if model.head is not None else {},
        **(notes or {}),
    }

    def write(tmp: Path) -> None:
        (tmp / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2))
        save_file(_tensors_for_saving(model.state_dict()), str(tmp / NATIVE_WEIGHTS))

    return write_output_dir(out_dir, "beitdist", write, overwrite=overwrite, run_owned=run_owned)


def export_hf(model: BeitForTask, out_dir: str | os.PathLike, *, overwrite: bool = False,
              model_type: str = "beit") -> Path:
    """A directory that transformers' BeitModel / BeitFor* `.from_pretrained` loads with no missing
    or unexpected keys (config.json + model.safetensors); with `model_type="data2vec-vision"`, its
    Data2VecVisionModel / Data2VecVisionFor* (classification, segmentation). Same output rules as
    `save_checkpoint`."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "hf", overwrite=overwrite)
    config = model.config
    head = model.head_name
    # refuses a head without a transformers model (for data2vec-vision: without a Data2VecVision one)
    hf_config = transformers_config(config, model.head, model_type)
    state = dict(model.state_dict())
    dim = config.embed_dim
    if not config.qkv_bias:  # transformers always has query/value biases
        for i in range(config.depth):
            state[f"backbone.blocks.{i}.attn.q_bias"] = torch.zeros(dim)
            state[f"backbone.blocks.{i}.attn.v_bias"] = torch.zeros(dim)
    # BeitModel always builds its pooler norm; Data2VecVisionModel builds none unless asked
    if head is None and config.pooling == "none" and model_type == "beit":
        state["backbone.fc_norm.weight"], state["backbone.fc_norm.bias"] = torch.ones(dim), torch.zeros(dim)
    if model.head is not None and not model.head.hf_pooler:  # the task model's BeitModel has no pooler
        state = {k: v for k, v in state.items() if not k.startswith("backbone.fc_norm.")}
    prefix = "" if head is None else HF_BACKBONE_PREFIX
    hf_state = native_to_hf(state, prefix=prefix, head_key=hf_head_key(model.head))
    if model_type == "data2vec-vision" and head is not None:
        hf_state = as_data2vec_keys(hf_state)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        save_file(_tensors_for_saving(hf_state), str(tmp / "model.safetensors"), metadata={"format": "pt"})

    return write_output_dir(out_dir, "hf", write, overwrite=overwrite)
