"""Measure the embedded model against its targets: ``python -m evaluation.embedded.evaluate``.

Greedy decoding, no compression, ``--n`` held-out samples per cell (seeds the training never draws: training pools
are seeded from ``random.Random(seed).randrange(2**31)``, these from ``--seed``): exact-answer accuracy
(RULER string_match_all) for the needle and variable-tracking tasks and teacher-forced token accuracy for the copy
task, at each prompt length (by default the shipped model's: 1,024, 2,048 and its trained 4,096); then CPU
prefill and decode speed at 1,024 and 4,096 tokens.
"""

from __future__ import annotations

import json
import time

import fire
import torch

from evaluation.embedded.train import COPY_TASK, evaluate
from evaluation.models import load_model
from presses.compat import cache_from_output, model_cache_kwarg

TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "fwe", "cwe", COPY_TASK)


@torch.no_grad()
def speed(model, tokens: int = 1024, new_tokens: int = 64) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one ``tokens``-long prompt, greedy, on the model's device."""
    ids = torch.randint(10, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    output = model(input_ids=ids, use_cache=True)
    prefill = time.perf_counter() - start
    cache, next_id = cache_from_output(output), output.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        output = model(input_ids=next_id, **{model_cache_kwarg(): cache}, use_cache=True)
        cache, next_id = cache_from_output(output), output.logits[:, -1:].argmax(-1)
    return tokens / prefill, new_tokens / (time.perf_counter() - start)


def main(model: str = "kvtiny", lengths: str = "1024,2048,4096", n: int = 100, seed: int = 123_456,
         tasks: str = ",".join(TASKS), output: str | None = None) -> None:
    loaded, tokenizer = load_model(model, "cpu", "float32")
    lengths = [int(x) for x in (lengths.split(",") if isinstance(lengths, str) else
                                lengths if isinstance(lengths, (list, tuple)) else [lengths])]
    task_list = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    table = {}
    print(f"{'prompt tokens':<14}" + "".join(f"{task:>17}" for task in task_list), flush=True)
    for length in lengths:
        table[length] = evaluate(loaded, tokenizer, task_list, length, n, seed)
        cells = ["-" if table[length][t] is None else f"{table[length][t]:.1f}" for t in task_list]
        print(f"{length:<14}" + "".join(f"{cell:>17}" for cell in cells), flush=True)
    speeds = {}
    for tokens in (1024, 4096):
        prefill, decode = speed(loaded, tokens)
        speeds[tokens] = {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode}
        print(f"CPU speed at {tokens} tokens ({torch.get_num_threads()} threads): prefill {prefill:.0f} tokens/s, "
              f"decode {decode:.0f} tokens/s")
    if output:
        with open(output, "w") as handle:
            json.dump({"accuracy": table, "speed": speeds, "n": n, "seed": seed}, handle, indent=2)


if __name__ == "__main__":
    fire.Fire(main)
