"""The one place that maps the press names users type to presses.

Entries are factories, not instances: every run builds a fresh press, so no run can leak state into another.
Each factory takes the press's knob (one of ``KNOBS``, declared by the press class) as a keyword, plus optional extra
constructor arguments of the outer press (e.g. ``decoding=True`` for the DMS presses).

Every name of kvpress's ``evaluation/evaluate_registry.py`` means here what it means there (same wrapper, same
defaults); ``KVPRESS_NAMES`` lists them. Our own presses have names kvpress does not use.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from presses.adakv_press import AdaKVPress
from presses.base_press import BasePress
from presses.block_press import BlockPress
from presses.cam_press import CAMPress
from presses.cap_press import CapPress
from presses.chunkkv_press import ChunkKVPress
from presses.compactor_press import CompactorPress
from presses.composed_press import ComposedPress
from presses.criticalkv_press import CriticalAdaKVPress, CriticalKVPress
from presses.cur_press import CURPress
from presses.decoding_press import DecodingPress
from presses.dms_press import DMSPress
from presses.duo_attention_press import DuoAttentionPress
from presses.errors import PressError
from presses.expected_attention_press import ExpectedAttentionPress
from presses.fastkvzip_press import FastKVzipPress
from presses.finch_press import FinchPress
from presses.keydiff_press import KeyDiffPress
from presses.knorm_press import KnormPress
from presses.kvcompose_press import KVComposePress
from presses.kvgrad_press import KVgradPress
from presses.kvzap_press import KVzapPress
from presses.kvzip_press import KVzipPress
from presses.lagkv_press import LagKVPress
from presses.leverage_press import LeverageScorePress
from presses.lukv_press import LUKVPress
from presses.merging_press import MergingPress
from presses.no_press import NoPress
from presses.non_causal_attention_press import NonCausalAttnPress
from presses.observed_attention_press import ObservedAttentionPress
from presses.pyramidkv_press import PyramidKVPress
from presses.qfilter_press import QFilterPress
from presses.random_press import RandomPress
from presses.restorekv_press import RestoreKVPress
from presses.simlayerkv_press import SimLayerKVPress
from presses.snapkv_press import SnapKVPress
from presses.streaming_llm_press import StreamingLLMPress
from presses.think_press import ThinKPress
from presses.tova_press import TOVAPress

# Every sweep knob a press can declare; the CLI has one list option per knob.
KNOBS = ("compression_ratio", "threshold", "key_channel_compression_ratio", "head_compression_ratio")


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
                **press_kwargs) -> BasePress:
    """A fresh press from its registry name and its knob value (the other knobs must stay None or absent)."""
    spec = get_spec(name)
    knob = spec.knob
    knob_values = {"compression_ratio": compression_ratio, "threshold": threshold,
                   **{k: press_kwargs.pop(k) for k in KNOBS if k in press_kwargs}}
    given = {k: v for k, v in knob_values.items() if v is not None}
    wrong = [k for k in given if k != knob]
    if wrong:
        takes = f"takes --{knob}" if knob else "takes neither --compression_ratio nor any other knob"
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
register("expected_attention",
         lambda compression_ratio=0.0, **kw: AdaKVPress(ExpectedAttentionPress(compression_ratio, epsilon=1e-2), **kw),
         "Expected Attention (epsilon 1e-2) with AdaKV head-wise budgets: kvpress's expected_attention")
register("expected_attention_plain", ExpectedAttentionPress,
         "attention expected from future queries modelled as Gaussians, one budget per head (Devoto et al. 2025)")
register("pyramidkv", PyramidKVPress, "SnapKV scores with budgets shrinking with depth (Cai et al. 2024)")
register("keydiff", KeyDiffPress, "keeps keys least similar to the mean key (Park et al. 2025)")
register("lagkv", LagKVPress, "scores each lag by its deviation from the next lag's statistics (Liang et al. 2025)")
register("kvzip", KVzipPress, "oracle: attention from a context-reconstruction pass (Kim et al. 2025)")
register("kvzip_plus", lambda compression_ratio=0.0, **kw: KVzipPress(compression_ratio,
                                                                        kvzip_plus_normalization=True, **kw),
         "KVzip with KVzap's output-norm normalisation (the KVzap target)")
register("kvgrad", KVgradPress, "KVzip's reconstruction attention x |W_o v| x gradient of the output (KVgrad, kvpress "
         "PR #279; not in kvpress's evaluate registry)")
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
register("decoding_tova", lambda **kw: DecodingPress(base_press=TOVAPress(), **kw),
         "TOVA applied while decoding: every 512 steps, keep 2048 pairs per head")
register("decoding_keydiff", lambda **kw: DecodingPress(base_press=KeyDiffPress(), **kw),
         "KeyDiff applied while decoding: every 512 steps, keep 2048 pairs per head")
register("decoding_adakv_expected_attention_e2",
         lambda **kw: DecodingPress(base_press=AdaKVPress(ExpectedAttentionPress(epsilon=1e-2)), **kw),
         "Expected Attention (epsilon 1e-2) with AdaKV budgets while decoding: every 512 steps, 2048 pairs per head")
register("decoding_adakv_snapkv", lambda **kw: DecodingPress(base_press=AdaKVPress(SnapKVPress()), **kw),
         "SnapKV with AdaKV budgets while decoding: every 512 steps, 2048 pairs per head on average")
register("cam_streaming_llm", lambda **kw: CAMPress(base_press=StreamingLLMPress(), **kw),
         "StreamingLLM while decoding, evicted values merged into the kept tokens after them (CaM, Zhang et al. 2024)")
register("cam_knorm", lambda **kw: CAMPress(base_press=KnormPress(), **kw),
         "knorm while decoding, evicted values merged into the kept tokens after them (CaM)")
register("cam_adakv_snapkv", lambda **kw: CAMPress(base_press=AdaKVPress(SnapKVPress()), **kw),
         "SnapKV scores while decoding, evicted values merged into the kept tokens after them (CaM)")
register("cam_tova", lambda **kw: CAMPress(base_press=TOVAPress(), **kw),
         "TOVA while decoding, evicted values merged into the kept tokens after them (CaM)")
register("kvcompose", KVComposePress,
         "re-reads the context; budgets per layer from composite attention curves (Akulov et al. 2025)")
register("kvcompose_unstructured", lambda compression_ratio=0.0, **kw: KVComposePress(structured=False,
                                                                                     compression_ratio=compression_ratio,
                                                                                     **kw),
         "KVCompose with a budget per (layer, head)")
register("block_keydiff",
         lambda compression_ratio=0.0, **kw: BlockPress(press=KeyDiffPress(compression_ratio), block_size=128, **kw),
         "KeyDiff evicting block by block (128 tokens) as in the KeyDiff paper (Park et al. 2025)")
register("chunkkv",
         lambda compression_ratio=0.0, **kw: ChunkKVPress(press=SnapKVPress(compression_ratio), chunk_length=20, **kw),
         "SnapKV scores, whole 20-token chunks kept (Liu et al. 2025)")
register("critical_snapkv", lambda compression_ratio=0.0, **kw: CriticalKVPress(SnapKVPress(compression_ratio), **kw),
         "SnapKV, then half the budget reweighted by |W_o v| (CriticalKV, Feng et al. 2025)")
register("critical_expected_attention",
         lambda compression_ratio=0.0, **kw: CriticalKVPress(
             ExpectedAttentionPress(compression_ratio, use_vnorm=False), **kw),
         "Expected Attention without value norm, then half the budget reweighted by |W_o v| (CriticalKV)")
register("critical_adakv_snapkv",
         lambda compression_ratio=0.0, **kw: CriticalAdaKVPress(SnapKVPress(compression_ratio), **kw),
         "CriticalKV inside AdaKV head-wise budgets, SnapKV scores")
register("critical_adakv_expected_attention",
         lambda compression_ratio=0.0, **kw: CriticalAdaKVPress(
             ExpectedAttentionPress(compression_ratio, use_vnorm=False), **kw),
         "CriticalKV inside AdaKV head-wise budgets, Expected Attention scores without value norm")
register("cur", CURPress, "keeps pairs with the largest key x value leverage scores (CurDKV, Sengupta et al. 2025)")
register("think", ThinKPress,
         "zeroes the least useful key channels, knob key_channel_compression_ratio (Xu et al. 2025)")
register("snap_think",
         lambda compression_ratio=0.0, key_channel_compression_ratio=0.5, **kw: ComposedPress(
             [SnapKVPress(compression_ratio), ThinKPress(key_channel_compression_ratio, **kw)]),
         "SnapKV then ThinK (key channel ratio 0.5 unless given as a press argument)")
register("compactor", CompactorPress,
         "key leverage blended with non-causal chunked attention, query-agnostic (Chari & Van Durme 2025)")
register("adakv_compactor", lambda compression_ratio=0.0, **kw: AdaKVPress(CompactorPress(compression_ratio), **kw),
         "Compactor scores with AdaKV head-wise budgets")
register("lukv", lambda compression_ratio=0.0, **kw: LUKVPress(ExpectedAttentionPress(epsilon=2e-2),
                                                              compression_ratio, sink=4, window=1, **kw),
         "Expected Attention with per-head budgets from a LU-KV curve (needs the model's budget curve .npy)")
register("cap", CapPress, "value capacity weighted by alignment with past queries (CAPKV, arXiv 2604.25975)")
register("leverage", LeverageScorePress, "approximate leverage of the pre-RoPE keys, Compactor's first half")
register("non_causal_attention", NonCausalAttnPress,
         "attention received within non-causal chunks times |v|, Compactor's second half")
register("simlayerkv", SimLayerKVPress,
         "lazy layers keep only sinks and recent tokens (Zhang et al. 2024); lazy_threshold 1 = off, as kvpress")
register("merging_knorm", lambda compression_ratio=0.0, **kw: MergingPress(KnormPress(compression_ratio), **kw),
         "knorm, evicted values merged into their most similar kept key's value")
register("merging_snapkv", lambda compression_ratio=0.0, **kw: MergingPress(SnapKVPress(compression_ratio), **kw),
         "SnapKV, evicted values merged into their most similar kept key's value")
register("merging_expected_attention",
         lambda compression_ratio=0.0, **kw: MergingPress(ExpectedAttentionPress(compression_ratio, epsilon=1e-2),
                                                          **kw),
         "Expected Attention (epsilon 1e-2), evicted values merged into their most similar kept key's value")


def _merging_kvzap(compression_ratio: float = 0.0, checkpoint: str | None = None, **kwargs) -> BasePress:
    return MergingPress(KVzapPress(compression_ratio, model_type="mlp", checkpoint=checkpoint), **kwargs)


register("merging_kvzap_mlp", _merging_kvzap, "KVzap MLP scores top-k, evicted values merged into similar kept ones")
register("duo_attention", DuoAttentionPress,
         "retrieval heads keep all, streaming heads sinks + recent window; published patterns (Xiao et al. 2025)")
register("duo_attention_on_the_fly", lambda head_compression_ratio=0.0, **kw: DuoAttentionPress(
    head_compression_ratio, on_the_fly_scoring=True, **kw), "DuoAttention with kvpress's on-the-fly head scores")
register("qfilter", QFilterPress, "keys projected on the queries' principal direction (Godey et al. 2025)")
register("decoding_qfilter", lambda **kw: DecodingPress(base_press=QFilterPress(), **kw),
         "Q-Filters applied while decoding: every 512 steps, keep 2048 pairs per head")
register("fastkvzip", FastKVzipPress, "gates trained on KVzip scores, evicted over all layers (Kim et al. 2026)")
register("RestoreKV", RestoreKVPress, "KVzip plus 8 learned restore tokens sharing the budget, LoRA adapter from "
         "higokri/RestoreKV-<model> (arXiv 2608.01247)")
register("RestoreKV_plus", lambda compression_ratio=0.0, **kw: RestoreKVPress(compression_ratio,
                                                                             kvzip_plus_normalization=True, **kw),
         "RestoreKV on KVzip+ scores, adapter higokri/RestoreKV-<model>_plus")
register("finch", FinchPress, "SnapKV-style, the question (after a delimiter token) as the window; query-aware only, "
         "kept keys re-rotated (Corallo & Papotti 2024)")

# kvpress's evaluate_registry.py names present here. Each means what it means in kvpress.
KVPRESS_NAMES = frozenset({
    "adakv_snapkv", "block_keydiff", "chunkkv", "critical_adakv_expected_attention", "critical_adakv_snapkv",
    "critical_expected_attention", "critical_snapkv", "cur", "expected_attention", "keydiff", "kvzip",
    "kvzip_plus", "kvzap_linear", "kvzap_mlp", "kvzap_mlp_head", "kvzap_mlp_layer", "lagkv", "knorm",
    "observed_attention", "pyramidkv", "random", "snap_think", "snapkv", "streaming_llm", "think", "tova",
    "no_press", "decoding_knorm", "decoding_streaming_llm", "decoding_tova", "decoding_keydiff",
    "decoding_adakv_expected_attention_e2", "decoding_adakv_snapkv",
    "cam_streaming_llm", "cam_knorm", "cam_adakv_snapkv", "cam_tova", "kvcompose", "kvcompose_unstructured",
    "lukv",
    "compactor", "adakv_compactor", "merging_knorm", "merging_snapkv", "merging_expected_attention",
    "merging_kvzap_mlp", "duo_attention", "duo_attention_on_the_fly", "qfilter", "decoding_qfilter", "fastkvzip",
    "finch", "RestoreKV", "RestoreKV_plus",
})
