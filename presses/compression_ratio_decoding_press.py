from __future__ import annotations

from dataclasses import dataclass

from presses.base_press import n_kept_pairs, validate_ratio
from presses.decoding_press import DecodingPress


@dataclass
class CompressionRatioDecodingPress(DecodingPress):
    """Compress while decoding to a fraction of every token seen so far, not to a fixed size.

    kvpress's CompressionRatioDecodingPress: every ``compression_interval`` steps each head keeps
    ``n_kept_pairs(tokens_seen, target_compression_ratio)`` pairs (kvpress's ``int(seen * (1 - ratio))``, at least
    1); ``target_size`` is unused. kvpress counts the tokens seen from the logical position ids; here the cache keeps
    every position (evictions are masks), so its length is that count.
    """

    target_compression_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_ratio(self.target_compression_ratio, type(self).__name__)

    def resolve_target_size(self, k_len: int) -> int:
        return n_kept_pairs(k_len, self.target_compression_ratio)
