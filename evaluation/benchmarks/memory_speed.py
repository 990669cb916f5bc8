"""What compact KV storage saves, measured side by side: ``python -m evaluation.benchmarks.memory_speed``.

For each model and shape (batch x context tokens) and each press (knorm, adakv_snapkv, kvzap_mlp at ~50%
compression), prints the KV bytes held over a dense cache's, and the time of one decoding step over a dense cache's,
for compact storage (pairs freed) and for masked storage (kvpress's way: every pair kept, evicted ones masked).
Steps are timed interleaved: each round of a shape times the dense references and every press's mask and compact
steps, in an order that rotates from round to round, so all see the same machine load; medians over the rounds are
kept. ``bound`` is the physical bound of a step that must read the weights and the KV bytes held: (weights + held) /
(weights + dense). Two dense references: the model's own sdpa over a dense cache (``compact step`` and ``mask step``
are over it), and the compact kernel over every pair (``same kernel``: compact over it). On CPU, transformers' sdpa
path copies each KV head for its query group (``repeat_kv``) before attending, which the compact kernel does not, so
``compact step`` can beat the physical bound; ``same kernel`` isolates what freeing pairs saves. ``floor bound``
counts what a step costs whatever its cache (the same kernel over 16 cached pairs, timed in the same rounds:
weights, Python, kernel launches) as a share that cannot shrink, and the rest as shrinking with the bytes held: on
kvtiny a batch-1 step is mostly such fixed costs, so the bytes bound is out of reach there.

The cache is filled with random keys and values (a step's time does not depend on their content); each press
decides on them from random hidden states (kvzap_mlp: the threshold is set at the median score, for ~50%).
Models: the embedded model (kvtiny, its shipped surrogate) and 2 randomly initialised Qwen3-8B-shaped layers in
float32 with a random 512-wide KVzap surrogate. Then, on kvtiny over a real RULER context, the prefill's KV peak
of kvzap_mlp with ``--prefill_chunk_size`` against a dense prefill's.

The last line is ``kv_bytes_ratio=... decode_step_ratio=...``: the worst press at batch 12 x 16k tokens on the
8B-shaped layers, compact storage, the step against the same kernel over every pair (then against sdpa).
"""

from __future__ import annotations

import statistics
import time

import fire
import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from evaluation.models import load_model
from presses import build_press, compat
from presses.base_press import LayerInputs
from presses.compact_cache import CompactLayer
from presses.generation import kv_bytes
from presses.kvzap_press import KVzapConfig, KVzapModel

QWEN3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288)
PRESSES = ("knorm", "adakv_snapkv", "kvzap_mlp")
FLOOR_TOKENS = 16


def qwen3_8b_layers(n_layers: int = 2) -> Qwen3ForCausalLM:
    config = Qwen3Config(**QWEN3_8B, num_hidden_layers=n_layers, vocab_size=1024, max_position_embeddings=40000,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).eval()


def make_press(name: str, model, kvzap_surrogate: KVzapModel | None):
    if name == "kvzap_mlp":
        press = build_press(name, threshold=0.0)
        press.press.surrogate = kvzap_surrogate
    else:
        press = build_press(name, compression_ratio=0.5)
    press.post_init_from_model(model)
    return press


def eviction_masks(model, press, keys: list[torch.Tensor], name: str) -> list[torch.Tensor]:
    """Per layer, the press's eviction mask (batch, kv_heads, n) over the random cache, from random hidden states."""
    config = compat.text_config(model)
    modules = compat.attention_modules(model)
    batch, _, n, _ = keys[0].shape
    generator = torch.Generator().manual_seed(1)
    masks = []
    for module, layer_keys in zip(modules, keys, strict=True):
        rows = []
        for b in range(batch):  # one row at a time: hidden states of 16k tokens x 4096 are 256 MB a row
            hidden = torch.randn(1, n, config.hidden_size, generator=generator)
            cos, sin = model.model.rotary_emb(hidden[:, :1], torch.arange(n)[None])
            evicted = torch.zeros(1, layer_keys.shape[1], n, dtype=torch.bool)
            layer = LayerInputs(module, hidden, (layer_keys[b:b + 1], layer_keys[b:b + 1]), None, evicted,
                                {"position_embeddings": (cos, sin)})
            if name == "kvzap_mlp":
                scores = press.press.scores_for(layer).float()
                rows.append(scores)
            else:
                rows.append(press.compress(layer))
            del hidden
        if name == "kvzap_mlp":
            scores = torch.cat(rows)
            threshold = scores[..., : n - press.sliding_window_size].median()
            evicted = scores < threshold
            evicted[..., n - press.sliding_window_size:] = False
            masks.append(evicted)
        else:
            masks.append(torch.cat(rows))
    return masks


def dense_cache(model, keys, values) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    for layer, k, v in zip(cache.layers, keys, values, strict=True):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v  # no copy: the same tensors for every storage
    return cache


def compact_cache(model, keys, values, masks) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    for index, (k, v, mask) in enumerate(zip(keys, values, masks, strict=True)):
        compat.replace_cache_layer(cache, index, CompactLayer.from_dense(k, v, mask))
    return cache


def step_seconds(model, cache, press, storage: str, masks, batch: int) -> float:
    """One decoding step (one token per row) after the cache; the cache is cut back after it."""
    ids = torch.zeros(batch, 1, dtype=torch.long)
    with press(model, kv_storage=storage):
        for index, mask in enumerate(masks):
            press.layer_state(index)["evicted"] = mask
        for index, _layer in enumerate(compat.attention_modules(model)):
            cache_layer = compat.cache_layer(cache, index)
            if isinstance(cache_layer, CompactLayer) and masks:
                cache_layer.applied = masks[index]
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, **{compat.model_cache_kwarg(): cache}, use_cache=True)
        elapsed = time.perf_counter() - start
    compat.crop_cache(cache, cache.get_seq_length() - 1)
    return elapsed


def measure_shape(model, surrogate, batch: int, n: int, repeats: int) -> list[dict]:
    config = compat.text_config(model)
    head_dim = compat.head_dim(compat.attention_modules(model)[0])
    generator = torch.Generator().manual_seed(0)
    shape = (batch, config.num_key_value_heads, n, head_dim)
    keys = [torch.randn(shape, generator=generator) for _ in range(config.num_hidden_layers)]
    values = [torch.randn(shape, generator=generator) for _ in range(config.num_hidden_layers)]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    dense = dense_cache(model, keys, values)
    dense_bytes = kv_bytes(dense)
    no_press = build_press("no_press")
    nothing_evicted = [torch.zeros(k.shape[:3], dtype=torch.bool) for k in keys]
    dense_packed = compact_cache(model, keys, values, nothing_evicted)  # every pair, read by the compact kernel
    # The same kernel over FLOOR_TOKENS cached pairs: what a step costs whatever the cache (weights, Python, kernel
    # launches). The step's cache-dependent part is what freeing pairs can shrink.
    floor_keys = [k[:, :, :FLOOR_TOKENS].clone() for k in keys]
    floor_values = [v[:, :, :FLOOR_TOKENS].clone() for v in values]
    floor_cache = compact_cache(model, floor_keys, floor_values,
                                [torch.zeros(k.shape[:3], dtype=torch.bool) for k in floor_keys])
    for layer in [*dense_packed.layers, *floor_cache.layers]:
        if not layer.packed:
            layer._pack_dense(torch.zeros(layer.keys.shape[:3], dtype=torch.bool))
    # Every press's caches are built first, then each round times the references and every press's steps together,
    # in an order that rotates from round to round: the presses see the same stretch of machine load (a press timed
    # in rounds of its own, after another's, drifted with the shared machine by up to 0.2; README, memory section).
    # The dense references (and the floor) do not depend on the press, so their medians are pooled over the rounds.
    prepared = []
    for name in PRESSES:
        press = make_press(name, model, surrogate)
        masks = eviction_masks(model, press, keys, name)
        kept = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        compact = compact_cache(model, keys, values, masks)
        prepared.append((name, press, masks, kept, compact, kv_bytes(compact)))
    steps = {"floor": (floor_cache, no_press, "compact", []), "dense": (dense, no_press, "mask", []),
             "dense_kernel": (dense_packed, no_press, "compact", [])}
    for name, press, masks, _, compact, _ in prepared:
        steps[f"{name} mask"] = (dense, press, "mask", masks)
        steps[f"{name} compact"] = (compact, press, "compact", masks)
    order = list(steps)
    timings = {key: [] for key in order}
    for round_index in range(repeats + 1):  # the first round warms up, and is dropped
        rotation = round_index % len(order)
        for key in order[rotation:] + order[:rotation]:
            cache, press, storage, masks = steps[key]
            seconds = step_seconds(model, cache, press, storage, masks, batch)
            if round_index:
                timings[key].append(seconds)
    reference = {key: timings[key] for key in ("dense", "dense_kernel", "floor")}
    measured = [(name, kept, held, {storage: statistics.median(timings[f"{name} {storage}"])
                                    for storage in ("mask", "compact")})
                for name, _, _, kept, _, held in prepared]
    del prepared, steps
    pooled = {k: statistics.median(v) for k, v in reference.items()}
    results = []
    for name, kept, held, median in measured:
        results.append({"press": name, "achieved": 1 - kept, "kv_bytes_ratio": held / dense_bytes,
                        "mask_step_ratio": median["mask"] / pooled["dense"],
                        "compact_step_ratio": median["compact"] / pooled["dense"],
                        "same_kernel_ratio": median["compact"] / pooled["dense_kernel"],
                        "kernel_vs_sdpa": pooled["dense_kernel"] / pooled["dense"],
                        "bound": (weights + held) / (weights + dense_bytes), "dense_step_ms": 1000 * pooled["dense"],
                        "floor_bound": floor_bound(pooled["floor"] / pooled["dense_kernel"], held / dense_bytes),
                        "dense_kv_gb": dense_bytes / 1e9, "weights_gb": weights / 1e9})
    return results


def floor_bound(floor: float, held: float) -> float:
    """The step's best ratio when its share ``floor`` (a step over FLOOR_TOKENS pairs, over a dense one) does not
    shrink and the rest shrinks with the KV bytes held (share ``held``): where a step is mostly fixed costs (kvtiny,
    a few milliseconds of Python and small kernels), this, not the bytes bound, is what freeing pairs can reach.
    A step over FLOOR_TOKENS pairs cannot cost more than one over all of them, so a measured share above 1 (timing
    noise, where the two steps are nearly equal, as on a tiny model) is read as 1: nothing can be saved."""
    floor = min(max(floor, 0.0), 1.0)
    return floor + (1 - floor) * held


def prefill_peak(chunk_size: int, length: int) -> dict:
    """kvzap_mlp's KV peak during the prefill of a RULER context, chunked and not, over a dense prefill's."""
    from evaluation.datasets.ruler_synthetic import generate_task
    from presses.generation import GenerationSettings, Measures, answer_questions
    from presses.pipeline import encode_prompt

    model, tokenizer = load_model("kvtiny", "cpu")
    record = generate_task("niah_single_1", tokenizer, length, num_samples=1)[0]
    parts = encode_prompt(tokenizer, record["context"], [record["question"]], record["answer_prefix"])
    peaks = {}
    for label, name, kwargs, chunk in (("dense", "no_press", {}, None),
                                       ("kvzap_mlp", "kvzap_mlp", {"threshold": -4.0}, None),
                                       ("kvzap_mlp chunked", "kvzap_mlp", {"threshold": -4.0}, chunk_size)):
        measures = Measures()
        answer_questions(model, tokenizer, parts.context_ids, parts.question_ids, build_press(name, **kwargs),
                         GenerationSettings(max_new_tokens=1), "compact", chunk, measures)
        peaks[label] = measures
    dense = peaks["dense"].kv_bytes_peak
    return {label: {"peak_ratio": m.kv_bytes_peak / dense, "held_ratio": m.kv_bytes_held_after_prefill / dense}
            for label, m in peaks.items()}


def main(repeats: int = 3, threads: int = 1, big_batch: int = 12, skip_8b: bool = False,
         chunk_size: int = 512) -> None:
    torch.set_num_threads(threads)
    kvtiny, _ = load_model("kvtiny", "cpu")
    kvtiny_surrogate = make_press("kvzap_mlp", kvtiny, None).press.surrogate
    models = [("kvtiny", kvtiny, kvtiny_surrogate)]
    if not skip_8b:
        big = qwen3_8b_layers()
        torch.manual_seed(0)
        surrogate = KVzapModel(KVzapConfig(input_dim=4096, output_dim=8, n_modules=2, hidden_dim=512)).eval()
        models.append(("qwen3-8b x2 layers", big, surrogate))
    print(f"{'model':<20} {'batch x tokens':>14} {'press':<13} {'achieved':>8} {'KV held':>8} {'mask step':>9} "
          f"{'compact step':>12} {'same kernel':>11} {'bound':>6} {'floor bound':>11} {'dense step':>10} "
          f"{'kernel/sdpa':>11}")
    headline, within = None, {"bound": 0, "floor bound": 0, "settings": 0}
    with torch.no_grad():
        for label, model, surrogate in models:
            for batch, n in ((1, 4096), (1, 16384), (big_batch, 16384)):
                rows = measure_shape(model, surrogate, batch, n, repeats)
                for row in rows:
                    print(f"{label:<20} {f'{batch} x {n}':>14} {row['press']:<13} {row['achieved']:>8.3f} "
                          f"{row['kv_bytes_ratio']:>8.3f} {row['mask_step_ratio']:>9.3f} "
                          f"{row['compact_step_ratio']:>12.3f} {row['same_kernel_ratio']:>11.3f} {row['bound']:>6.3f} "
                          f"{row['floor_bound']:>11.3f} "
                          f"{row['dense_step_ms']:>8.1f}ms {row['kernel_vs_sdpa']:>11.3f}", flush=True)
                    within["settings"] += 1
                    within["bound"] += row["same_kernel_ratio"] <= 1.1 * row["bound"]
                    within["floor bound"] += row["same_kernel_ratio"] <= 1.1 * row["floor_bound"]
                if label.startswith("qwen3") and batch == big_batch:
                    headline = (max(r["kv_bytes_ratio"] for r in rows), max(r["same_kernel_ratio"] for r in rows),
                                max(r["compact_step_ratio"] for r in rows))
    print(f"compact steps (same kernel) within 10% of the bytes bound: {within['bound']}/{within['settings']}, "
          f"of the floor bound: {within['floor bound']}/{within['settings']}")
    peaks = prefill_peak(chunk_size, 4096)
    for label, row in peaks.items():
        print(f"prefill of a 4k RULER context on kvtiny, {label}: KV peak {row['peak_ratio']:.3f} of a dense "
              f"prefill's, held after {row['held_ratio']:.3f}")
    if headline is not None:
        print(f"kv_bytes_ratio={headline[0]:.3f} decode_step_ratio={headline[1]:.3f} "
              f"decode_step_ratio_vs_sdpa={headline[2]:.3f}")


if __name__ == "__main__":
    fire.Fire(main)
