"""kvpress-eval's library of KV-cache compression presses.

Use a press as a context manager around a Hugging Face causal LM::

    from presses import KnormPress
    with KnormPress(compression_ratio=0.5)(model):
        model.generate(input_ids, max_new_tokens=32)

or build one by its registry name: ``build_press("kvzap_mlp", threshold=-4)``.
"""

from presses.adakv_press import AdaKVPress
from presses.base_press import BasePress, LayerInputs
from presses.block_press import BlockPress
from presses.cam_press import CAMPress
from presses.cap_press import CapPress
from presses.chunk_press import ChunkPress
from presses.chunkkv_press import ChunkKVPress
from presses.compactor_press import CompactorPress
from presses.composed_press import ComposedPress
from presses.compression_ratio_decoding_press import CompressionRatioDecodingPress
from presses.criticalkv_press import CriticalAdaKVPress, CriticalKVPress
from presses.cur_press import CURPress
from presses.decoding_press import DecodingPress
from presses.dms_press import DMSPress, ThresholdPress
from presses.duo_attention_press import DuoAttentionPress
from presses.errors import PressError
from presses.expected_attention_press import ExpectedAttentionPress
from presses.expected_attention_stats_press import ExpectedAttentionStatsPress
from presses.fastkvzip_press import FastKVzipPress
from presses.finch_press import FinchPress
from presses.generation import Answer, GenerationSettings, answer_questions, decode
from presses.key_rerotation_press import KeyRerotationPress
from presses.keydiff_press import KeyDiffPress
from presses.knorm_press import KnormPress
from presses.kvcompose_press import KVComposePress
from presses.kvgrad_press import KVgradPress
from presses.kvzap_press import KVzapConfig, KVzapModel, KVzapPress
from presses.kvzip_press import KVzipPress
from presses.lagkv_press import LagKVPress
from presses.leverage_press import LeverageScorePress
from presses.lukv_press import LUKVPress
from presses.merging_press import MergingPress
from presses.no_press import NoPress
from presses.non_causal_attention_press import NonCausalAttnPress
from presses.observed_attention_press import ObservedAttentionPress
from presses.per_layer_compression_press import PerLayerCompressionPress
from presses.pipeline import KVPressTextGenerationPipeline, encode_prompt, register_pipeline
from presses.prefill_decoding_press import PrefillDecodingPress
from presses.pyramidkv_press import PyramidKVPress
from presses.qfilter_press import QFilterPress
from presses.random_press import RandomPress
from presses.registry import PRESSES, build_press, get_spec, press_names
from presses.restorekv_press import RestoreKVPress
from presses.scorer_press import ScorerPress
from presses.simlayerkv_press import SimLayerKVPress
from presses.snapkv_press import SnapKVPress
from presses.streaming_llm_press import StreamingLLMPress
from presses.think_press import ThinKPress
from presses.tova_press import TOVAPress

register_pipeline()

__all__ = [
    "AdaKVPress", "Answer", "BasePress", "BlockPress", "CAMPress", "CURPress", "CapPress", "ChunkKVPress",
    "ChunkPress", "CompactorPress", "ComposedPress", "CompressionRatioDecodingPress", "CriticalAdaKVPress",
    "CriticalKVPress", "DMSPress", "DecodingPress", "DuoAttentionPress", "ExpectedAttentionPress",
    "ExpectedAttentionStatsPress", "FastKVzipPress", "FinchPress", "GenerationSettings", "KVComposePress",
    "KVPressTextGenerationPipeline", "KVgradPress", "KVzapConfig", "KVzapModel", "KVzapPress", "KVzipPress",
    "KeyDiffPress",
    "KeyRerotationPress", "KnormPress", "LUKVPress", "LagKVPress", "LayerInputs", "LeverageScorePress",
    "MergingPress", "NoPress", "NonCausalAttnPress", "ObservedAttentionPress", "PRESSES", "PerLayerCompressionPress",
    "PrefillDecodingPress", "PressError", "PyramidKVPress", "QFilterPress", "RandomPress", "RestoreKVPress",
    "ScorerPress",
    "SimLayerKVPress", "SnapKVPress", "StreamingLLMPress", "TOVAPress", "ThinKPress", "ThresholdPress",
    "answer_questions", "build_press", "decode", "encode_prompt", "get_spec", "press_names",
]
