"""Base of presses that wrap a scorer and decide differently what to keep from its scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from presses.base_press import BasePress, validate_ratio
from presses.errors import PressError
from presses.scorer_press import ScorerPress


@dataclass
class ScorerWrapperPress(BasePress):
    """A press around one ``ScorerPress``; its ``compression_ratio`` is the wrapped press's (as in kvpress)."""

    press: ScorerPress = None
    knob: ClassVar[str | None] = "compression_ratio"

    def __post_init__(self) -> None:
        if not isinstance(self.press, ScorerPress):
            raise PressError(f"{type(self).__name__} wraps a ScorerPress (e.g. press=SnapKVPress()), "
                             f"got {type(self.press).__name__}")

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        validate_ratio(value, type(self).__name__)
        self.press.compression_ratio = value

    def children(self) -> list[BasePress]:
        return [self.press]

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        self.press.post_init_from_model(model, tokenizer)


def check_positive_int(press: object, name: str) -> None:
    """One-line PressError unless ``press.<name>`` is a positive integer."""
    value = getattr(press, name)
    if not isinstance(value, int) or value < 1:
        raise PressError(f"{type(press).__name__}: {name} must be a positive integer, got {value!r}")
