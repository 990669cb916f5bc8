"""kvpress-eval's library of KV-cache compression presses.

Use a press as a context manager around a Hugging Face causal LM::

    from presses import KnormPress
    with KnormPress(compression_ratio=0.5)(model):
        model.generate(input_ids, max_new_tokens=32)

or build one by its registry name: ``build_press("kvzap_mlp", threshold=-4)``.
"""

from presses.adakv_press import AdaKVPress
from presses.base_press import BasePress, LayerInputs
from presses.composed_press import ComposedPress
from presses.decoding_press import DecodingPress
from presses.dms_press import DMSPress, ThresholdPress
from presses.duo_attention_press import DuoAttentionPress
from presses.errors import PressError
from presses.expected_attention_press import ExpectedAttentionPress
from presses.fastkvzip_press import FastKVzipPress
from presses.generation import Answer, GenerationSettings, answer_questions, decode
from presses.keydiff_press import KeyDiffPress
from presses.knorm_press import KnormPress
from presses.kvzap_press import KVzapConfig, KVzapModel, KVzapPress
from presses.kvzip_press import KVzipPress
from presses.lagkv_press import LagKVPress
from presses.no_press import NoPress
from presses.observed_attention_press import ObservedAttentionPress
from presses.pipeline import KVPressTextGenerationPipeline, encode_prompt, register_pipeline
from presses.prefill_decoding_press import PrefillDecodingPress
from presses.pyramidkv_press import PyramidKVPress
from presses.qfilter_press import QFilterPress
from presses.random_press import RandomPress
from presses.registry import PRESSES, build_press, get_spec, press_names
from presses.scorer_press import ScorerPress
from presses.snapkv_press import SnapKVPress
from presses.streaming_llm_press import StreamingLLMPress
from presses.tova_press import TOVAPress

register_pipeline()

__all__ = [
    "AdaKVPress", "Answer", "BasePress", "ComposedPress", "DMSPress", "DecodingPress", "DuoAttentionPress",
    "ExpectedAttentionPress", "FastKVzipPress", "QFilterPress",
    "GenerationSettings", "KVPressTextGenerationPipeline", "KVzapConfig", "KVzapModel", "KVzapPress", "KVzipPress",
    "KeyDiffPress", "KnormPress", "LagKVPress", "LayerInputs", "NoPress", "ObservedAttentionPress", "PRESSES",
    "PrefillDecodingPress", "PressError", "PyramidKVPress", "RandomPress", "ScorerPress", "SnapKVPress",
    "StreamingLLMPress", "TOVAPress", "ThresholdPress", "answer_questions", "build_press", "decode",
    "encode_prompt", "get_spec", "press_names",
]
