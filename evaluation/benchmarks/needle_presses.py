"""Single-needle retrieval on kvtiny at one compression level: ``python -m evaluation.benchmarks.needle_presses``.

RULER ``niah_single_1`` at ``--length`` tokens (1,024 by default), ``--n`` held-out samples, greedy, exact answer
(string_match_all); each press at its knob's 50% point (``head_compression_ratio`` for DuoAttention, ``threshold``
for kvzap_mlp). Prints accuracy and the compression each press achieved. This is the check behind the README's
artifact-press numbers.
"""

from __future__ import annotations

import fire
import torch

from evaluation.datasets.ruler_synthetic import generate_task
from evaluation.metrics.ruler import string_match_all
from evaluation.models import load_model
from presses import build_press
from presses.generation import GenerationSettings, answer_questions
from presses.pipeline import encode_prompt

PRESSES = (("no_press", {}), ("random", {"compression_ratio": 0.5, "seed": 0}),
           ("duo_attention", {"head_compression_ratio": 0.5}),
           ("duo_attention_on_the_fly", {"head_compression_ratio": 0.5}), ("qfilter", {"compression_ratio": 0.5}),
           ("fastkvzip", {"compression_ratio": 0.5}), ("kvzip", {"compression_ratio": 0.5}),
           ("kvzap_mlp_head", {"compression_ratio": 0.5}), ("kvzap_mlp", {"threshold": -4.0}))


def needle_accuracy(model, tokenizer, name: str, kwargs: dict, records: list[dict]) -> tuple[float, float]:
    """(accuracy %, mean achieved compression) of one press over ``records``."""
    correct, achieved = 0, 0.0
    for record in records:
        press = build_press(name, **kwargs)
        parts = encode_prompt(tokenizer, record["context"], [record["question"]], record["answer_prefix"])
        answers, ratio = answer_questions(model, tokenizer, parts.context_ids, parts.question_ids, press,
                                          GenerationSettings(max_new_tokens=record["max_new_tokens"]))
        correct += string_match_all(answers[0].text, record["answer"]) >= 1
        achieved += ratio
    return 100 * correct / len(records), achieved / len(records)


def main(n: int = 50, seed: int = 2025, length: int = 1024, presses: str | tuple | None = None,
         model: str = "kvtiny") -> None:
    """``--model``: the embedded name or a local folder holding the model and its artifacts (``kvzap-mlp/``, ...)."""
    torch.manual_seed(0)
    loaded, tokenizer = load_model(model, "cpu", "float32")
    records = generate_task("niah_single_1", tokenizer, length, n, seed=seed)
    names = presses.split(",") if isinstance(presses, str) else presses
    chosen = [p for p in PRESSES if names is None or p[0] in names]
    print(f"{'press':<26} {'setting':<28} {'accuracy':>8} {'achieved':>9}")
    for name, kwargs in chosen:
        accuracy, achieved = needle_accuracy(loaded, tokenizer, name, kwargs, records)
        setting = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "seed") or "-"
        print(f"{name:<26} {setting:<28} {accuracy:>8.1f} {achieved:>9.3f}", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
