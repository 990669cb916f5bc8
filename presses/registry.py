"""The one place that maps the press names users type to presses.

Entries are factories, not instances: every run builds a fresh press, so no run can leak state into another.
Each factory takes the press's knob (``compression_ratio`` or ``threshold``) as a keyword, plus optional extra
constructor arguments of the outer press (e.g. ``decoding=True`` for the DMS presses).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from presses.adakv_press import AdaKVPress
from presses.base_press import BasePress
from presses.decoding_press import DecodingPress
from presses.dms_press import DMSPress
from presses.duo_attention_press import DuoAttentionPress
from presses.errors import PressError
from presses.expected_attention_press import ExpectedAttentionPress
from presses.fastkvzip_press import FastKVzipPress
from presses.keydiff_press import KeyDiffPress
from presses.knorm_press import KnormPress
from presses.kvzap_press import KVzapPress
from presses.kvzip_press import KVzipPress
from presses.lagkv_press import LagKVPress
from presses.no_press import NoPress
from presses.observed_attention_press import ObservedAttentionPress
from presses.pyramidkv_press import PyramidKVPress
from presses.qfilter_press import QFilterPress
from presses.random_press import RandomPress
from presses.snapkv_press import SnapKVPress
from presses.streaming_llm_press import StreamingLLMPress
from presses.tova_press import TOVAPress

KNOBS = ("compression_ratio", "threshold", "head_compression_ratio")


@dataclass(frozen=True)
class PressSpec:
    """A registered press: its name, how to build it, and one line for ``--help`` and the README."""

    name: str
    factory: Callable[..., BasePress]
    description: str

    @property
    def knob(self) -> str | None:
        return self.factory().knob


PRESSES: dict[str, PressSpec] = {}


def register(name: str, factory: Callable[..., BasePress], description: str) -> None:
    """Add a press under ``name``; names are unique."""
    if name in PRESSES:
        raise ValueError(f"press '{name}' is already registered")
    if not callable(factory):
        raise TypeError(f"the factory of press '{name}' must be callable")
    PRESSES[name] = PressSpec(name, factory, description)


def press_names() -> list[str]:
    return sorted(PRESSES)


def get_spec(name: str) -> PressSpec:
    """The spec of a registered press, or a one-line error with the close matches and the full list."""
    if name in PRESSES:
        return PRESSES[name]
    close = difflib.get_close_matches(name, PRESSES, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise PressError(f"unknown press '{name}': {hint}choose from {', '.join(press_names())}")


def build_press(name: str, compression_ratio: float | None = None, threshold: float | None = None,
                head_compression_ratio: float | None = None, **press_kwargs) -> BasePress:
    """A fresh press from its registry name and its knob value (the other knobs must stay None)."""
    spec = get_spec(name)
    knob = spec.knob
    values = (compression_ratio, threshold, head_compression_ratio)
    given = {k: v for k, v in zip(KNOBS, values, strict=True) if v is not None}
    wrong = [k for k in given if k != knob]
    if wrong:
        takes = f"takes --{knob}" if knob else f"takes neither {' nor '.join('--' + k for k in KNOBS)}"
        raise PressError(f"press '{name}' {takes}, not --{wrong[0]}: drop --{wrong[0]} for this press")
    return spec.factory(**given, **press_kwargs)


def _dms_kvzap(model_type: str) -> Callable[..., BasePress]:
    def factory(threshold: float = 0.0, checkpoint: str | None = None, **kwargs) -> BasePress:
        return DMSPress(KVzapPress(model_type=model_type, checkpoint=checkpoint), threshold=threshold, **kwargs)

    return factory


register("no_press", NoPress, "no compression: the reference every press is compared with")
register("random", lambda compression_ratio=0.0, **kw: RandomPress(compression_ratio, **kw),
         "evicts random pairs (the floor)")
register("knorm", KnormPress, "keeps keys with the smallest L2 norm (Devoto et al. 2024)")
register("streaming_llm", StreamingLLMPress, "keeps 4 sink tokens and the most recent ones (Xiao et al. 2024)")
register("snapkv", SnapKVPress, "attention from the last 64 context tokens, pooled (Li et al. 2024)")
register("tova", TOVAPress, "attention from the last token, averaged over heads (Oren et al. 2024)")
register("observed_attention", ObservedAttentionPress,
         "average attention each key received in the prefill; needs eager attention (H2O-style)")
register("expected_attention", ExpectedAttentionPress,
         "attention expected from future queries modelled as Gaussians (Devoto et al. 2025)")
register("pyramidkv", PyramidKVPress, "SnapKV scores with budgets shrinking with depth (Cai et al. 2024)")
register("keydiff", KeyDiffPress, "keeps keys least similar to the mean key (Park et al. 2025)")
register("lagkv", LagKVPress, "scores each lag by its deviation from the next lag's statistics (Liang et al. 2025)")
register("kvzip", KVzipPress, "oracle: attention from a context-reconstruction pass (Kim et al. 2025)")
register("kvzip_plus", lambda compression_ratio=0.0, **kw: KVzipPress(compression_ratio,
                                                                        kvzip_plus_normalization=True, **kw),
         "KVzip with KVzap's output-norm normalisation (the KVzap target)")
register("kvzap_linear", _dms_kvzap("linear"), "KVzap linear surrogate, DMS threshold eviction (Jegou et al. 2026)")
register("kvzap_mlp", _dms_kvzap("mlp"), "KVzap MLP surrogate, DMS threshold eviction (Jegou et al. 2026)")
register("kvzap_mlp_head", lambda compression_ratio=0.0, **kw: KVzapPress(compression_ratio, model_type="mlp", **kw),
         "KVzap MLP scores, top-k per head")
register("kvzap_mlp_layer",
         lambda compression_ratio=0.0, **kw: AdaKVPress(KVzapPress(compression_ratio, model_type="mlp", **kw)),
         "KVzap MLP scores, AdaKV head-wise budget per layer")
register("adakv_snapkv", lambda compression_ratio=0.0, **kw: AdaKVPress(SnapKVPress(compression_ratio), **kw),
         "SnapKV scores with AdaKV head-wise budgets (Feng et al. 2024)")
register("adakv_expected_attention",
         lambda compression_ratio=0.0, **kw: AdaKVPress(ExpectedAttentionPress(compression_ratio), **kw),
         "Expected Attention scores with AdaKV head-wise budgets")
register("decoding_knorm", lambda **kw: DecodingPress(base_press=KnormPress(), **kw),
         "knorm applied while decoding: every 512 steps, keep 2048 pairs per head")
register("decoding_streaming_llm", lambda **kw: DecodingPress(base_press=StreamingLLMPress(), **kw),
         "StreamingLLM applied while decoding: every 512 steps, keep 2048 pairs per head")
register("duo_attention", DuoAttentionPress,
         "retrieval heads keep all, streaming heads sinks + recent window; published patterns (Xiao et al. 2025)")
register("duo_attention_on_the_fly", lambda head_compression_ratio=0.0, **kw: DuoAttentionPress(
    head_compression_ratio, on_the_fly_scoring=True, **kw), "DuoAttention with kvpress's on-the-fly head scores")
register("qfilter", QFilterPress, "keys projected on the queries' principal direction (Godey et al. 2025)")
register("decoding_qfilter", lambda **kw: DecodingPress(base_press=QFilterPress(), **kw),
         "Q-Filters applied while decoding: every 512 steps, keep 2048 pairs per head")
register("fastkvzip", FastKVzipPress, "gates trained on KVzip scores, evicted over all layers (Kim et al. 2026)")
