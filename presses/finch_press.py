"""FINCH: compress the context with the question it will be asked, SnapKV-style, the question as the window.

Corallo and Papotti, "FINCH: Prompt-guided Key-Value Cache Compression for Large Language Models", TACL 12 (2024),
doi 10.1162/tacl_a_00716.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from presses import compat
from presses.base_press import LayerInputs, keep_top_scores, n_kept_pairs
from presses.errors import PressError
from presses.key_rerotation_press import rerotate_kept_keys, rotary_inv_freq
from presses.scorer_press import ScorerPress
from presses.snapkv_press import keep_window, window_attention

DELIMITER = "<|finch_sep|>"


@dataclass
class FinchPress(ScorerPress):
    """Keep the context pairs the question attends to most; the question's own pairs are always kept.

    FINCH (Corallo & Papotti, TACL 2024) as kvpress's ``FinchPress``. The prompt is ``context + delimiter +
    question``, prefilled at once (query-aware): the delimiter token marks where the question starts and is dropped
    from the ids, so the model sees context + question. As in kvpress the prefill must be a plain forward (our
    ``answer_questions``, the pipeline), not ``model.generate``, whose position ids would count the delimiter. The
    question's w tokens are the observation window: their attention weights to the k_len - w earlier keys (batch,
    num_heads, w, k_len - w), with ``normalize_scores`` multiplied per window row by ``k_len - w + row`` (kvpress's
    count of non-zero weights), are averaged over the window and over the query heads of each KV head. Every head
    keeps ``n_kept_pairs(k_len, ratio)`` of all k_len pairs (window included), per ``chunk_length`` slice if set;
    with ``rerotate_keys`` the kept keys are re-rotated as if contiguous (see ``rerotate_kept_keys``).

    Deviations from kvpress: the model and its embeddings are left as they are. kvpress resizes the embeddings to
    the tokenizer (it adds an output row for the delimiter, or for Qwen3 cuts the vocabulary padding) so that the
    delimiter can be embedded and then removed; here the delimiter is removed from the ids before the embedding, so
    it needs no row, and the other presses of a sweep see the same model. The window scores rank above the best
    context score with later tokens higher (kvpress: all tied at max + 1; it matters only when the budget is smaller
    than the question).
    """

    chunk_length: int | None = None
    normalize_scores: bool = True
    rerotate_keys: bool = True
    delimiter_token: str = DELIMITER
    delimiter_token_id: int | None = field(default=None, repr=False)
    needs_question = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_length is not None and (not isinstance(self.chunk_length, int) or self.chunk_length < 1):
            raise PressError(f"FinchPress: chunk_length must be None or a positive integer, got {self.chunk_length!r}")

    @property
    def rewrites_cache(self) -> bool:  # re-rotation writes the kept keys in place
        return self.rerotate_keys

    def prompt_delimiter(self, tokenizer) -> str:
        """The delimiter token, added to ``tokenizer`` as a special token if it lacks it (as kvpress)."""
        if self.delimiter_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [self.delimiter_token]},
                                         replace_extra_special_tokens=False)
        self.delimiter_token_id = tokenizer.convert_tokens_to_ids(self.delimiter_token)
        return self.delimiter_token

    def update_model_and_tokenizer(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                                   delimiter_token: str = DELIMITER) -> PreTrainedTokenizerBase:
        """kvpress's set-up call: register the delimiter with the tokenizer (the model needs no change here)."""
        self.delimiter_token = delimiter_token
        self.prompt_delimiter(tokenizer)
        return tokenizer

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        if tokenizer is not None:
            self.prompt_delimiter(tokenizer)
        if self.delimiter_token_id is None:
            raise PressError("FinchPress needs its delimiter token: use it as `with press(model, tokenizer):` or call "
                             "press.update_model_and_tokenizer(model, tokenizer) first")
        self.__dict__["_inv_freq"] = rotary_inv_freq(model, "FinchPress") if self.rerotate_keys else None

    @contextmanager
    def __call__(self, model: nn.Module, tokenizer=None, kv_storage: str = "compact") -> Iterator[FinchPress]:
        """The base hooks, plus one before the base model that finds the delimiter and removes it from the ids."""
        base = model.model if hasattr(model, "model") else model
        with super().__call__(model, tokenizer, kv_storage):
            handle = base.register_forward_pre_hook(self._split_at_delimiter, with_kwargs=True)
            try:
                yield self
            finally:
                handle.remove()

    def _split_at_delimiter(self, module: nn.Module, args: tuple, kwargs: dict):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or input_ids.shape[1] == 1:
            return None  # embeddings given, or a decoding step
        found = input_ids == self.delimiter_token_id
        self.__dict__["_window"] = None
        if not bool(found.any()):
            return None
        if input_ids.shape[0] != 1 or int(found.sum()) != 1:
            raise PressError("FinchPress needs batch size 1 and exactly one delimiter token between the context and "
                             f"the question, got {int(found.sum())} in a batch of {input_ids.shape[0]}")
        if kwargs.get("position_ids") is not None or kwargs.get("attention_mask") is not None:
            # They would count the delimiter, which the model never sees (model.generate passes both).
            raise PressError("FinchPress prefills without position_ids or attention_mask (model.generate adds them): "
                             "answer with presses.answer_questions or the kv-press-text-generation pipeline")
        position = int(found[0].nonzero()[0, 0])
        self.__dict__["_window"] = input_ids.shape[1] - 1 - position
        ids = input_ids[:, ~found[0]]
        if "input_ids" in kwargs:
            return args, {**kwargs, "input_ids": ids}
        return (ids, *args[1:]), kwargs

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        """(batch, kv_heads, k_len) float32: the window's normalised attention, the window itself on top."""
        batch, kv_heads, k_len, _ = keys.shape
        window = self.__dict__.get("_window")
        if not window:
            raise PressError(f"FinchPress found no question after a delimiter token {self.delimiter_token!r}: the "
                             "prompt must be context + delimiter + question (run it with --query_aware true)")
        window = min(window, k_len - 1)
        if window < 1:
            return torch.zeros(batch, kv_heads, k_len, device=keys.device)
        if attentions is not None:
            weights = attentions[..., -window:, : k_len - window].float()
        else:
            weights = window_attention(module, hidden_states, keys, window, kwargs["position_embeddings"])
        if self.normalize_scores:  # undo the dilution of early window rows, which attend to fewer keys
            counts = torch.arange(k_len - window, k_len, device=weights.device, dtype=weights.dtype)
            weights = weights * counts[:, None]
        scores = weights.mean(dim=-2).view(batch, kv_heads, compat.num_key_value_groups(module), -1).mean(dim=2)
        return keep_window(scores, window)

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.compression_ratio == 0:
            return layer.evicted
        scores = self.scores_for(layer)
        if self.chunk_length is None:
            evicted = keep_top_scores(scores, n_kept_pairs(layer.k_len, self.compression_ratio), layer.evicted)
        else:
            window = self.__dict__["_window"]
            if self.chunk_length * (1 - self.compression_ratio) <= window:  # the last chunk must keep the question
                least = int(window / (1 - self.compression_ratio))
                raise PressError(f"FinchPress: chunk_length {self.chunk_length} keeps fewer pairs than the "
                                 f"{window}-token question: use chunk_length > {least}")
            parts = []
            for start in range(0, layer.k_len, self.chunk_length):
                end = min(start + self.chunk_length, layer.k_len)
                parts.append(keep_top_scores(scores[..., start:end], n_kept_pairs(end - start, self.compression_ratio),
                                             layer.evicted[..., start:end]))
            evicted = torch.cat(parts, dim=-1)
        if self.rerotate_keys:
            rerotate_kept_keys(layer.keys, evicted, self.__dict__.get("_inv_freq"), "FinchPress")
        return evicted
