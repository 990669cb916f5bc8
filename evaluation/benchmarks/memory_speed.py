"""What compact KV storage saves, measured side by side: ``python -m evaluation.benchmarks.memory_speed``.

For each model and shape (batch x context tokens) and each press (knorm, adakv_snapkv, kvzap_mlp at ~50%
compression), prints the KV bytes held over a dense cache's, and the time of one decoding step over a dense cache's,
for compact storage (pairs freed) and for masked storage (kvpress's way: every pair kept, evicted ones masked).
Steps are timed interleaved: each round of a shape times the dense references and every press's mask and compact
steps, in an order that rotates from round to round, so all see the same machine load; medians over the rounds are
kept (``--repeats`` rounds at least, and more until ``--min_seconds`` of steps: a kvtiny step of a few milliseconds
moves by half its length from round to round). ``bound`` is the physical bound of a step that must read the weights
and the KV bytes held: (weights + held) / (weights + dense). Two dense references: the model's own sdpa over a dense
cache (``compact step`` and ``mask step`` are over it), and the compact kernel over every pair (``same kernel``:
compact over it). On CPU, transformers' sdpa path copies each KV head for its query group (``repeat_kv``) before
attending, which the compact kernel does not, so ``compact step`` can beat the physical bound; ``same kernel``
isolates what freeing pairs saves. ``floor bound`` counts what a step costs whatever its cache (the same kernel over
16 cached pairs, timed in the same rounds: weights, Python, kernel launches) as a share that cannot shrink, and the
rest as shrinking with the bytes held: on kvtiny a batch-1 step is mostly such fixed costs, so the bytes bound is
out of reach there.

The cache is filled with random keys and values (a step's time does not depend on their content); each press
decides on them from random hidden states (kvzap_mlp: the threshold is set at the median score, for ~50%).
Models: the embedded model (kvtiny, its shipped surrogate) and ``--layers`` randomly initialised Qwen3-8B-shaped
layers (2 by default, 36 for full depth) in ``--dtype`` with a random 512-wide KVzap surrogate, at ``--shapes``
(batch x tokens; 1x4096, 1x16384 and 12x16384 by default). Then, on kvtiny over a real RULER context, the
prefill's KV peak of kvzap_mlp with ``--prefill_chunk_size`` against a dense prefill's; with ``--prefill_tokens``,
the same on the 8B-shaped layers over random tokens, and on a GPU the CUDA allocator's peak beside it. The GPU run:
``--device cuda --dtype bfloat16 --layers 36 --shapes 1x32768,6x32768 --prefill_tokens 32768 --skip_kvtiny``
(6 x 32k tokens is where the dense cache, 29.0 GB, passes twice the weights' 13.9 GB).

The last line is ``kv_bytes_ratio=... decode_step_ratio=...``: the worst press at the largest shape (batch 12 x 16k
tokens by default) on the 8B-shaped layers, compact storage, the step against the same kernel over every pair (then
against sdpa).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import fire
import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from evaluation.config import ConfigError
from evaluation.models import check_device, load_model
from presses import build_press, compat
from presses.base_press import BasePress, LayerInputs
from presses.compact_cache import CompactLayer
from presses.generation import (
    GenerationSettings,
    Measures,
    answer_questions,
    device_clock,
    kv_bytes,
    per_token_kv_bytes,
)
from presses.kvzap_press import KVzapConfig, KVzapModel

QWEN3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288)
PRESSES = ("knorm", "adakv_snapkv", "kvzap_mlp")
FLOOR_TOKENS = 16


def qwen3_8b_layers(n_layers: int = 2, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM:
    """``n_layers`` randomly initialised Qwen3-8B-shaped layers (36: full depth), built on ``device`` in ``dtype``."""
    config = Qwen3Config(**QWEN3_8B, num_hidden_layers=n_layers, vocab_size=1024, max_position_embeddings=40000,
                         attn_implementation="sdpa", dtype=dtype)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialised where it runs: 8B parameters drawn on a CPU take minutes
            return Qwen3ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


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
    device, dtype = keys[0].device, keys[0].dtype
    generator = torch.Generator(device=device).manual_seed(1)
    masks = []
    for module, layer_keys in zip(modules, keys, strict=True):
        rows = []
        for b in range(batch):  # one row at a time: hidden states of 16k tokens x 4096 are 256 MB a row
            hidden = torch.randn(1, n, config.hidden_size, generator=generator, device=device, dtype=dtype)
            cos, sin = model.model.rotary_emb(hidden[:, :1], torch.arange(n, device=device)[None])
            evicted = torch.zeros(1, layer_keys.shape[1], n, dtype=torch.bool, device=device)
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
    device = next(model.parameters()).device
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    with press(model, kv_storage=storage):
        for index, mask in enumerate(masks):
            press.layer_state(index)["evicted"] = mask
        for index, _layer in enumerate(compat.attention_modules(model)):
            cache_layer = compat.cache_layer(cache, index)
            if isinstance(cache_layer, CompactLayer) and masks:
                cache_layer.applied = masks[index]
        start = device_clock(device)
        with torch.no_grad():
            model(input_ids=ids, **{compat.model_cache_kwarg(): cache}, use_cache=True)
        elapsed = device_clock(device) - start
    compat.crop_cache(cache, cache.get_seq_length() - 1)
    return elapsed


def measure_shape(model, surrogate, batch: int, n: int, repeats: int, min_seconds: float = 0.0) -> list[dict]:
    """Rows of one shape: ``repeats`` timed rounds after a warm-up round, more while the rounds take under
    ``min_seconds`` in all (steps of a few milliseconds move by half their length from round to round)."""
    config = compat.text_config(model)
    head_dim = compat.head_dim(compat.attention_modules(model)[0])
    parameter = next(model.parameters())
    generator = torch.Generator(device=parameter.device).manual_seed(0)
    shape = (batch, config.num_key_value_heads, n, head_dim)
    keys, values = ([torch.randn(shape, generator=generator, device=parameter.device, dtype=parameter.dtype)
                     for _ in range(config.num_hidden_layers)] for _ in range(2))
    weights = weight_bytes(model)
    dense = dense_cache(model, keys, values)
    dense_bytes = kv_bytes(dense)
    no_press = build_press("no_press")
    nothing_evicted = [torch.zeros(k.shape[:3], dtype=torch.bool, device=k.device) for k in keys]
    dense_packed = compact_cache(model, keys, values, nothing_evicted)  # every pair, read by the compact kernel
    # The same kernel over FLOOR_TOKENS cached pairs: what a step costs whatever the cache (weights, Python, kernel
    # launches). The step's cache-dependent part is what freeing pairs can shrink.
    floor_keys = [k[:, :, :FLOOR_TOKENS].clone() for k in keys]
    floor_values = [v[:, :, :FLOOR_TOKENS].clone() for v in values]
    floor_cache = compact_cache(model, floor_keys, floor_values,
                                [torch.zeros(k.shape[:3], dtype=torch.bool, device=k.device) for k in floor_keys])
    for layer in [*dense_packed.layers, *floor_cache.layers]:
        if not layer.packed:
            layer._pack_dense(torch.zeros(layer.keys.shape[:3], dtype=torch.bool, device=layer.keys.device))
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
    round_index, timed = 0, 0.0
    while round_index <= repeats or timed < min_seconds:  # the first round warms up, and is dropped
        rotation = round_index % len(order)
        for key in order[rotation:] + order[:rotation]:
            cache, press, storage, masks = steps[key]
            seconds = step_seconds(model, cache, press, storage, masks, batch)
            if round_index:
                timings[key].append(seconds)
                timed += seconds
        round_index += 1
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
                        "dense_kv_gb": dense_bytes / 1e9, "weights_gb": weights / 1e9,
                        "rounds": len(reference["dense"])})
    return results


def floor_bound(floor: float, held: float) -> float:
    """The step's best ratio when its share ``floor`` (a step over FLOOR_TOKENS pairs, over a dense one) does not
    shrink and the rest shrinks with the KV bytes held (share ``held``): where a step is mostly fixed costs (kvtiny,
    a few milliseconds of Python and small kernels), this, not the bytes bound, is what freeing pairs can reach.
    A step over FLOOR_TOKENS pairs cannot cost more than one over all of them, so a measured share above 1 (timing
    noise, where the two steps are nearly equal, as on a tiny model) is read as 1: nothing can be saved."""
    floor = min(max(floor, 0.0), 1.0)
    return floor + (1 - floor) * held


def prefill_peaks(model, tokenizer, context_ids: torch.Tensor, question_ids: list[torch.Tensor],
                  kvzap: Callable[[], BasePress], chunk_size: int) -> dict:
    """A dense prefill's peak and held KV, and ``kvzap``'s (a kvzap_mlp press) with and without chunks, as shares of
    the dense prefill's; on a GPU also the CUDA allocator's peak (weights, activations, cache) in bytes."""
    peaks = {}
    for label, make, chunk in (("dense", lambda: build_press("no_press"), None), ("kvzap_mlp", kvzap, None),
                               ("kvzap_mlp chunked", kvzap, chunk_size)):
        measures = Measures()
        _, achieved = answer_questions(model, tokenizer, context_ids, question_ids, make(),
                                       GenerationSettings(max_new_tokens=1), "compact", chunk, measures)
        peaks[label] = (measures, achieved)
    dense = peaks["dense"][0].kv_bytes_peak
    return {label: {"peak_ratio": m.kv_bytes_peak / dense, "held_ratio": m.kv_bytes_held_after_prefill / dense,
                    "achieved": achieved, "device_peak_bytes": m.device_peak_bytes}
            for label, (m, achieved) in peaks.items()}


def ruler_prefill_peaks(chunk_size: int, length: int) -> dict:
    """:func:`prefill_peaks` on kvtiny over a RULER context, its shipped surrogate at threshold -4."""
    from evaluation.datasets.ruler_synthetic import generate_task
    from presses.pipeline import encode_prompt

    model, tokenizer = load_model("kvtiny", "cpu")
    record = generate_task("niah_single_1", tokenizer, length, num_samples=1)[0]
    parts = encode_prompt(tokenizer, record["context"], [record["question"]], record["answer_prefix"])
    return prefill_peaks(model, tokenizer, parts.context_ids, parts.question_ids,
                         lambda: build_press("kvzap_mlp", threshold=-4.0), chunk_size)


def random_prefill_peaks(model, surrogate: KVzapModel, tokens: int, chunk_size: int) -> dict:
    """:func:`prefill_peaks` on a random-weight model over random token ids, kvzap_mlp's threshold set at the median
    score of a first prefill (a random surrogate's scores have no fixed scale), for about half the pairs evicted."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(2)
    vocab = compat.text_config(model).vocab_size
    context_ids = torch.randint(vocab, (1, tokens), generator=generator, device=device)
    question_ids = [torch.randint(vocab, (1, 16), generator=generator, device=device)]
    press = make_press("kvzap_mlp", model, surrogate)
    cache = DynamicCache(config=model.config)
    with press(model, kv_storage="mask"):
        model(input_ids=context_ids, **{compat.model_cache_kwarg(): cache}, use_cache=True)
        scores = torch.cat([press.layer_state(index)["scores"][..., : tokens - press.sliding_window_size].flatten()
                            for index in range(len(compat.attention_modules(model)))])
    threshold = float(scores.float().median())
    del cache, scores

    def kvzap() -> BasePress:
        calibrated = make_press("kvzap_mlp", model, surrogate)
        calibrated.threshold = threshold
        return calibrated

    return prefill_peaks(model, None, context_ids, question_ids, kvzap, chunk_size)


def parse_shapes(shapes) -> list[tuple[int, int]]:
    """``"1x4096,12x16384"`` (or Fire's tuple of it) as [(batch, tokens), ...]."""
    items = shapes.split(",") if isinstance(shapes, str) else list(shapes)
    try:
        return [(int(batch), int(tokens)) for batch, tokens in (str(item).strip().split("x") for item in items)]
    except ValueError:
        raise SystemExit(f"memory_speed: --shapes {shapes!r}: give batch x tokens pairs, e.g. 1x4096,12x16384"
                         ) from None


def main(repeats: int = 3, min_seconds: float = 20.0, threads: int = 1, big_batch: int = 12, skip_8b: bool = False,
         chunk_size: int = 512, device: str = "cpu", dtype: str = "float32", layers: int = 2,
         shapes: str | None = None, skip_kvtiny: bool = False, prefill_tokens: int | None = None) -> None:
    """``--device cuda --dtype bfloat16 --layers 36 --shapes 1x32768,6x32768 --prefill_tokens 32768 --skip_kvtiny``
    is the GPU run: full-depth Qwen3-8B-shaped layers, and the prefill's peak from the CUDA allocator. Each shape
    is timed over ``repeats`` rounds at least, and over ``min_seconds`` of steps at least."""
    torch.set_num_threads(threads)
    try:
        check_device(device)
    except ConfigError as error:
        raise SystemExit(f"memory_speed: {error}") from None
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise SystemExit(f"memory_speed: --dtype {dtype} is not a torch dtype: use float32, bfloat16 or float16")
    grid = parse_shapes(shapes or f"1x4096,1x16384,{big_batch}x16384")
    models = []
    if not skip_kvtiny:
        kvtiny, _ = load_model("kvtiny", device, dtype)
        models.append(("kvtiny", kvtiny, make_press("kvzap_mlp", kvtiny, None).press.surrogate))
    if not skip_8b:
        big = qwen3_8b_layers(layers, device, torch_dtype)
        torch.manual_seed(0)
        big_surrogate = KVzapModel(KVzapConfig(input_dim=4096, output_dim=8, n_modules=layers, hidden_dim=512)).eval()
        models.append((f"qwen3-8b x{layers} layers", big, big_surrogate))
    if device.startswith("cuda"):
        print(f"{torch.cuda.get_device_name(device)}, {dtype}")
    print(f"{'model':<20} {'batch x tokens':>14} {'press':<13} {'achieved':>8} {'KV held':>8} {'mask step':>9} "
          f"{'compact step':>12} {'same kernel':>11} {'bound':>6} {'floor bound':>11} {'dense step':>10} "
          f"{'kernel/sdpa':>11}")
    headline, within = None, {"bound": 0, "floor bound": 0, "settings": 0}
    largest = max(grid, key=lambda shape: shape[0] * shape[1])
    with torch.no_grad():
        for label, model, surrogate in models:
            for batch, n in grid:
                if device.startswith("cuda"):
                    # dense keys and values, their copy for the same kernel, three presses' compact caches at ~0.55,
                    # and room for a step's temporaries: a shape that cannot fit is said, not crashed on
                    needed = 3.8 * per_token_kv_bytes(model) * batch * n + 2**31
                    free, _ = torch.cuda.mem_get_info(device)
                    if needed > free:
                        print(f"{label} {batch} x {n}: skipped, needs about {needed / 2**30:.0f} GiB of the "
                              f"{free / 2**30:.0f} GiB free", flush=True)
                        continue
                rows = measure_shape(model, surrogate, batch, n, repeats, min_seconds)
                for row in rows:
                    print(f"{label:<20} {f'{batch} x {n}':>14} {row['press']:<13} {row['achieved']:>8.3f} "
                          f"{row['kv_bytes_ratio']:>8.3f} {row['mask_step_ratio']:>9.3f} "
                          f"{row['compact_step_ratio']:>12.3f} {row['same_kernel_ratio']:>11.3f} {row['bound']:>6.3f} "
                          f"{row['floor_bound']:>11.3f} "
                          f"{row['dense_step_ms']:>8.1f}ms {row['kernel_vs_sdpa']:>11.3f}", flush=True)
                    within["settings"] += 1
                    within["bound"] += row["same_kernel_ratio"] <= 1.1 * row["bound"]
                    within["floor bound"] += row["same_kernel_ratio"] <= 1.1 * row["floor_bound"]
                if label.startswith("qwen3") and (batch, n) == largest:
                    headline = (max(r["kv_bytes_ratio"] for r in rows), max(r["same_kernel_ratio"] for r in rows),
                                max(r["compact_step_ratio"] for r in rows))
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        print(f"compact steps (same kernel) within 10% of the bytes bound: {within['bound']}/{within['settings']}, "
              f"of the floor bound: {within['floor bound']}/{within['settings']}")
        prefills = []
        if not skip_kvtiny:
            prefills.append(("a 4k RULER context on kvtiny", ruler_prefill_peaks(chunk_size, 4096), None))
        if prefill_tokens and not skip_8b:
            weights = weight_bytes(big)
            prefills.append((f"{prefill_tokens} random tokens on {models[-1][0]}",
                             random_prefill_peaks(big, big_surrogate, prefill_tokens, chunk_size), weights))
    for what, peaks, weights in prefills:
        for label, row in peaks.items():
            line = (f"prefill of {what}, {label}: achieved {row['achieved']:.3f}, KV peak {row['peak_ratio']:.3f} "
                    f"of a dense prefill's, held after {row['held_ratio']:.3f}")
            if row["device_peak_bytes"] is not None and weights is not None:
                dense_peak = peaks["dense"]["device_peak_bytes"]
                line += (f"; CUDA allocator peak {row['device_peak_bytes'] / 2**30:.2f} GiB, above the weights "
                         f"{(row['device_peak_bytes'] - weights) / (dense_peak - weights):.3f} of a dense prefill's")
            print(line, flush=True)
    if headline is not None:
        print(f"kv_bytes_ratio={headline[0]:.3f} decode_step_ratio={headline[1]:.3f} "
              f"decode_step_ratio_vs_sdpa={headline[2]:.3f}")


if __name__ == "__main__":
    fire.Fire(main)
