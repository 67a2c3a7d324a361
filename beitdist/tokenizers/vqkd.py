"""BEiT v2's VQ-KD visual tokenizer (arXiv 2208.06366, section 2.2), for pretraining targets: a
released unilm VQ-KD checkpoint (`vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth`) read as it
is.

Tokens, as unilm's `VQKD.get_codebook_indices` computes them: pixels in [0, 1] rescaled to
[-1, 1] ("default"; or ImageNet-normalised), a ViT encoder (BEiT's, with absolute positions and
mean-pooling norm applied to every patch token), `encode_task_layer` (Linear, Tanh, Linear down to
the code dimension), then the nearest code by cosine similarity: both the patch vector and the
codebook rows are l2-normalised, so the nearest in Euclidean distance is the largest dot product.
The decoder and the teacher are training-only parts: their keys are read past, not used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from beitdist.backbone.beit import Beit
from beitdist.backbone.convert import CheckpointError, infer_backbone_config, unilm_to_native
from beitdist.errors import InputError
from beitdist.hookspecs import hookimpl
from beitdist.schema import check
from beitdist.tokenizers.base import Tokenizer

log = logging.getLogger(__name__)

ENCODER = "encoder."
TASK_LAYER = "encode_task_layer."
CODEBOOK = "quantize.embedding.weight"
TRAINING_ONLY = ("decoder.", "decode_task_layer.", "quantize.", "loss", "teacher", "scaling_layer.")
"""Keys of a VQ-KD checkpoint that tokenizing does not read (the codebook excepted)."""
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NUM_HEADS_KEY = "num_heads"
"""Metadata of a .safetensors VQ-KD file (`beitdist tokenizer export-vqkd` writes it): the encoder's
head count, which its weights hold only in a relative-position table."""


@dataclass(frozen=True)
class VqkdOptions:
    path: str
    """A unilm VQ-KD checkpoint (.pth, `{"model": ...}`) or its state dict as .safetensors."""
    input_size: int = 224
    """Side of the view to tokenize (unilm: --second_input_size 224)."""
    process: Literal["default", "imagenet_norm"] = "default"
    """How pixels in [0, 1] are normalised for the encoder: unilm's `process_type`."""
    num_heads: int | None = None
    """Attention heads of the encoder: default the count a beitdist export records, else the
    relative-position table's, else embed_dim // 64 (unilm's ViT-B/L encoders)."""
    trust_pickle: bool = False
    """Allow arbitrary unpickling of a .pth (trusted files only); plain state dicts need none."""

    def __post_init__(self) -> None:
        check(bool(self.path), "path", "expected the path of a VQ-KD checkpoint")
        check(self.input_size > 0, "input_size", f"expected a positive int, got {self.input_size}")
        check(self.num_heads is None or self.num_heads > 0, "num_heads", f"expected > 0, got {self.num_heads}")


def recorded_num_heads(path: Path) -> int | None:
    """The head count a .safetensors VQ-KD file records (`NUM_HEADS_KEY`), else None."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        value = (f.metadata() or {}).get(NUM_HEADS_KEY)
    return int(value) if value and value.isdigit() and int(value) > 0 else None


def split_checkpoint(state: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor],
                                                                        dict[str, torch.Tensor], torch.Tensor]:
    """(encoder keys without `encoder.`, task layer keys without its prefix, codebook); a key that
    is none of VQ-KD's is refused, naming it."""
    encoder = {k[len(ENCODER):]: v for k, v in state.items() if k.startswith(ENCODER)}
    task = {k[len(TASK_LAYER):]: v for k, v in state.items() if k.startswith(TASK_LAYER)}
    unknown = sorted(k for k in state if not k.startswith((ENCODER, TASK_LAYER, *TRAINING_ONLY)))
    if unknown:
        raise CheckpointError(f"{where}: not a VQ-KD checkpoint (unexpected keys {unknown[:5]}); expected "
                              "encoder.*, encode_task_layer.*, quantize.embedding.weight, decoder.*")
    missing = [name for name, part in (("encoder.*", encoder), ("encode_task_layer.*", task)) if not part]
    if CODEBOOK not in state:
        missing.append(CODEBOOK)
    if missing:
        raise CheckpointError(f"{where}: not a VQ-KD checkpoint (missing {', '.join(missing)})")
    return encoder, task, state[CODEBOOK]


class VqkdTokenizer(Tokenizer):
    """See the module docstring."""

    name = "vqkd"
    Options = VqkdOptions
    codebook: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        from beitdist.checkpoint import read_tensors

        path = Path(self.opts.path)
        if not path.is_file():
            raise InputError(f"tokenizer.options.path: {path}: no such VQ-KD checkpoint (unilm's "
                             "vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth, downloaded beforehand)")
        where = str(path)
        encoder_state, task_state, codebook = split_checkpoint(read_tensors(path, self.opts.trust_pickle), where)
        native = unilm_to_native(encoder_state)
        config = infer_backbone_config(native, where)
        num_heads = self.opts.num_heads or recorded_num_heads(path)
        if num_heads is not None:
            config = config.replace(num_heads=num_heads)
        elif config.rel_pos_bias == "none":
            config = config.replace(num_heads=max(1, config.embed_dim // 64))
        if config.image_size != (self.opts.input_size, self.opts.input_size):
            raise InputError(f"tokenizer.options.input_size: {self.opts.input_size}, but the VQ-KD encoder in "
                             f"{where} was trained at {config.image_size[0]} px")
        self.encoder = Beit(config)
        encoder_keys = {k.removeprefix("backbone."): v for k, v in native.items()}
        problems = self.encoder.load_state_dict(encoder_keys, strict=False)
        if problems.missing_keys or problems.unexpected_keys:
            raise CheckpointError(f"{where}: the VQ-KD encoder does not fit BEiT's (missing "
                                  f"{problems.missing_keys[:5]}, unexpected {problems.unexpected_keys[:5]})")
        dim, code_dim = config.embed_dim, codebook.shape[1]
        self.task_layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, code_dim))
        try:
            self.task_layer.load_state_dict(task_state)
        except RuntimeError as err:
            reason = " ".join(str(err).split())[:300]
            raise CheckpointError(f"{where}: encode_task_layer does not fit ({reason})") from None
        self.register_buffer("codebook", F.normalize(codebook.float(), dim=-1))
        mean, std = ((0.5,) * 3, (0.5,) * 3) if self.opts.process == "default" else (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.vocab_size = int(codebook.shape[0])
        self.input_size = self.opts.input_size
        self.eval().requires_grad_(False)
        log.info("VQ-KD tokenizer %s: %d codes of dim %d, encoder %d x %d at %d px", where, self.vocab_size,
                 code_dim, config.depth, dim, self.input_size)

    def train(self, mode: bool = True) -> VqkdTokenizer:  # never trains: dropout stays off
        return super().train(False)

    def code_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, code_dim) l2-normalised vectors that are compared with the codebook."""
        size = self.input_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise InputError(f"VQ-KD tokenizer expects images (B, 3, {size}, {size}) in [0, 1], "
                             f"got {tuple(images.shape)}")
        x = (images.float() - self.mean) / self.std  # "default": x * 2 - 1, unilm's [-1, 1]
        tokens = self.encoder(x).last_hidden_state[:, 1:]
        if self.encoder.fc_norm is not None:  # unilm's use_mean_pooling encoder: fc_norm on every patch
            tokens = self.encoder.fc_norm(tokens)
        return F.normalize(self.task_layer(tokens), dim=-1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (self.code_vectors(images) @ self.codebook.t()).argmax(dim=-1)


@hookimpl
def beitdist_register_tokenizers(registry) -> None:
    registry.add(VqkdTokenizer)
