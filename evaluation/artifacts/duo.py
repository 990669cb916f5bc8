"""``kvpress-eval build-duo-patterns``: DuoAttention head patterns for any model, offline.

Method: kvpress's on-the-fly scorer (:func:`presses.duo_attention_press.on_the_fly_head_scores`) averaged over
texts, not the paper's optimisation (which trains a gate per head by distillation on synthetic passkey retrieval with
an L1 penalty: hours of GPU time for a 7B model and a training loop through the whole model). The on-the-fly scorer
needs forwards only, runs in seconds on small models, is the estimate kvpress itself falls back to, and makes the
shipped patterns and ``duo_attention_on_the_fly`` the same method (differing only in window and texts). Scores are
rescaled to [0, 1] (min-max over heads; the ranking, which is all the press uses, is unchanged) since DuoAttention's
loader clips to [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch

from evaluation.kvzap.train import TrainSettings, load_texts
from presses.duo_attention_press import PATTERNS_FOLDER, DuoPatterns, on_the_fly_head_scores, save_patterns


def build_duo_patterns(model, tokenizer, output_dir: str | Path, settings: TrainSettings, sink_size: int = 64,
                       recent_size: int = 256, q_len: int = 500) -> Path:
    """Score every (layer, KV head) over the texts of ``settings``; write ``<output_dir>/duo-attention``."""
    texts = load_texts(settings, tokenizer)
    contexts = [torch.tensor([tokenizer.encode(text, add_special_tokens=False)]) for text in texts]
    scores = on_the_fly_head_scores(model, contexts, q_len)
    low, high = scores.min(), scores.max()
    scaled = (scores - low) / (high - low) if high > low else torch.ones_like(scores)
    meta = {"method": "kvpress on-the-fly scorer", "texts": settings.texts, "n_texts": len(texts), "q_len": q_len,
            "model": str(getattr(model, "name_or_path", "")), "raw_scores": scores.tolist()}
    return save_patterns(Path(output_dir) / PATTERNS_FOLDER, DuoPatterns(sink_size, recent_size, scaled), meta)
