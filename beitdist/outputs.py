"""Model outputs: dicts with attribute access.

They are dicts (not dataclasses) because DeepSpeed ZeRO-3 attaches its backward hooks to the
tensors it finds in a module's outputs, and it only looks inside tuples, lists and dicts: with a
dataclass output, parameters used directly by a module (the CLS token) are never re-gathered for
backward.
"""

from __future__ import annotations

from typing import Any, ClassVar


class Output(dict):
    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(self.fields):
            raise TypeError(f"{type(self).__name__} takes at most {len(self.fields)} positional values")
        values = dict.fromkeys(self.fields)
        values.update(zip(self.fields, args))
        unknown = set(kwargs) - set(self.fields)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown field(s) {sorted(unknown)}")
        values.update(kwargs)
        super().__init__(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.fields:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        self[name] = value


class BackboneOutput(Output):
    """last_hidden_state (B, 1 + N, D) after the final norm; pooler_output (B, D) or None;
    hidden_states (embeddings + every block) when asked; intermediates (requested blocks)."""

    fields = ("last_hidden_state", "pooler_output", "hidden_states", "intermediates")


class ModelOutput(Output):
    """logits of the head (None for a bare backbone), last_hidden_state, pooler_output,
    hidden_states, aux_logits (segmentation's auxiliary head), and loss when `forward` was given
    labels (as transformers' outputs: `transformers.Trainer` reads `outputs["loss"]`)."""

    fields = ("logits", "last_hidden_state", "pooler_output", "hidden_states", "aux_logits", "loss")
