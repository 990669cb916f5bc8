"""Compact KV storage: evicted pairs are freed, and nothing a press decides changes with the storage."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers import DynamicCache, QuantizedCache, StaticCache

from evaluation.datasets.ruler_synthetic import generate_task
from evaluation.models import load_model
from presses import KnormPress, compat
from presses.compact_cache import MIN_PAGE_SIZE, CompactLayer, page_size
from presses.decoding_press import DecodingPress
from presses.errors import PressError
from presses.generation import GenerationSettings, Measures, answer_questions
from presses.pipeline import encode_prompt
from presses.registry import KNOBS, build_press, get_spec, press_names


@pytest.fixture(scope="module")
def kvtiny():
    return load_model("kvtiny", "cpu")


@pytest.fixture(scope="module")
def needles(kvtiny):
    _, tokenizer = kvtiny
    return generate_task("niah_single_1", tokenizer, 512, num_samples=2, seed=3)


def held_bound(kept: float, n_tokens: int) -> float:
    """Most a compact cache may hold, as a share of dense, for a kept share: under one page of padding per head,
    and a page is at most a sixteenth of a layer's mean kept pairs per head, or the smallest page."""
    return kept * (1 + 1 / 16) + (MIN_PAGE_SIZE - 1) / n_tokens + 1e-9


def knob_value(name: str) -> dict:
    knob = get_spec(name).knob
    return {} if knob is None else {knob: {"compression_ratio": 0.5, "threshold": -4.0}.get(knob, 0.5)}


def answer(kvtiny, record, press, storage: str, questions: int = 2, chunk: int | None = None,
           max_new_tokens: int = 12) -> tuple[list[str], Measures]:
    model, tokenizer = kvtiny
    parts = encode_prompt(tokenizer, record["context"], [record["question"], "What is the first word?"][:questions],
                          record["answer_prefix"])
    measures = Measures()
    answers, _ = answer_questions(model, tokenizer, parts.context_ids, parts.question_ids, press,
                                  GenerationSettings(max_new_tokens=max_new_tokens), storage, chunk, measures)
    return [a.text for a in answers], measures


@pytest.mark.parametrize("name", press_names())
def test_every_press_answers_the_same_with_compact_and_masked_storage(kvtiny, needles, name):
    assert set(KNOBS) >= {"compression_ratio", "threshold"}
    outcome, presses = {}, {}
    for storage in ("mask", "compact"):
        try:
            presses[storage] = build_press(name, **knob_value(name))
            outcome[storage] = answer(kvtiny, needles[0], presses[storage], storage)
        except PressError as error:  # a press this model cannot run fails the same way in both storages
            outcome[storage] = str(error)
    assert type(outcome["mask"]) is type(outcome["compact"])
    if isinstance(outcome["mask"], str):
        assert outcome["mask"] == outcome["compact"]
        return
    (masked, mask_measures), (compact, measures) = outcome["mask"], outcome["compact"]
    assert compact == masked
    assert mask_measures.kv_bytes_held_after_prefill == mask_measures.kv_bytes_dense
    assert measures.kv_bytes_held_after_prefill <= measures.kv_bytes_dense
    press = presses["compact"]
    # what a press evicts from the context is no longer held (decoding presses evict later, while answering)
    if press.storage_for(kvtiny[0]) == "compact" and not press.compresses_while_decoding:
        context_share = measures.kv_bytes_held_after_prefill / measures.kv_bytes_dense
        n_tokens = measures.kv_bytes_dense // (2 * 4 * 2 * 32 * 4)  # kvtiny: 4 layers, 2 KV heads of 32 floats
        assert context_share <= held_bound(1 - press.achieved_compression_ratio, n_tokens)


@pytest.mark.parametrize("name", ["knorm", "streaming_llm", "snapkv", "tova"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_same_count_presses_hold_exactly_their_kept_share(kvtiny, needles, name, ratio):
    press = build_press(name, compression_ratio=ratio)
    _, measures = answer(kvtiny, needles[0], press, "compact", questions=1, max_new_tokens=2)
    held = measures.kv_bytes_held_after_prefill / measures.kv_bytes_dense
    assert abs(held - (1 - press.achieved_compression_ratio)) < 0.01
    assert measures.kv_bytes_held_end[0] > measures.kv_bytes_held_after_prefill  # question and answer tokens


@pytest.mark.parametrize("name", ["adakv_snapkv", "kvzap_mlp"])
def test_head_wise_presses_hold_pages_close_to_their_kept_pairs(kvtiny, needles, name):
    press = build_press(name, **knob_value(name))
    _, measures = answer(kvtiny, needles[0], press, "compact", questions=1, max_new_tokens=2)
    kept = 1 - press.achieved_compression_ratio
    held = measures.kv_bytes_held_after_prefill / measures.kv_bytes_dense
    n_tokens = measures.kv_bytes_dense // (2 * 4 * 2 * 32 * 4)  # kvtiny: 4 layers, 2 KV heads of 32 floats
    assert kept <= held <= held_bound(kept, n_tokens)


def test_positions_stay_right_after_compaction_needles_are_still_found(kvtiny):
    # At 1,024 tokens threshold -4 evicts about 72% of kvtiny's pairs and masked storage still finds both needles.
    # Retrieval is a coarse check of positions: with RoPE base 500,000, new tokens placed ~650 positions early still
    # found these needles. The exact check is the storage-identity tests above, which such an error fails.
    needles = generate_task("niah_single_1", kvtiny[1], 1024, num_samples=2, seed=3)
    found = {}
    for storage in ("mask", "compact"):
        answers = [answer(kvtiny, record, build_press("kvzap_mlp", threshold=-4.0), storage, questions=1)[0][0]
                   for record in needles]
        found[storage] = [any(a in text for a in record["answer"])
                          for text, record in zip(answers, needles, strict=True)]
    assert found["compact"] == found["mask"] and all(found["compact"])


def test_chunked_prefill_bounds_the_prefill_peak_and_is_storage_independent(kvtiny, needles):
    record = needles[0]
    _, dense = answer(kvtiny, record, build_press("no_press"), "mask", questions=1, max_new_tokens=1)
    texts, chunked = answer(kvtiny, record, build_press("kvzap_mlp", threshold=-4.0), "compact", questions=1,
                            chunk=64, max_new_tokens=1)
    masked, _ = answer(kvtiny, record, build_press("kvzap_mlp", threshold=-4.0), "mask", questions=1, chunk=64,
                       max_new_tokens=1)
    assert texts == masked
    assert chunked.kv_bytes_peak <= 0.8 * dense.kv_bytes_peak  # window 128 + a 256-token fold margin at 512 tokens
    with pytest.raises(PressError, match="threshold press"):
        answer(kvtiny, record, build_press("knorm", compression_ratio=0.5), "compact", questions=1, chunk=64)


def test_a_decoding_press_frees_pairs_and_every_question_sees_the_same_context(kvtiny, needles):
    def press():
        return DecodingPress(base_press=KnormPress(), compression_interval=4, target_size=96)

    masked, _ = answer(kvtiny, needles[0], press(), "mask", questions=2, max_new_tokens=12)
    compact, measures = answer(kvtiny, needles[0], press(), "compact", questions=2, max_new_tokens=12)
    assert compact == masked
    assert max(measures.kv_bytes_held_end) < 0.5 * measures.kv_bytes_dense


def reference_attention(query, keys, values, evicted, scaling):
    """Dense attention of the last q positions with evicted pairs masked (float64): (output, weights)."""
    batch, heads, n, dim = keys.shape
    groups = query.shape[1] // heads
    q_len = query.shape[2]
    k = keys.repeat_interleave(groups, 1).double()
    v = values.repeat_interleave(groups, 1).double()
    logits = query.double() @ k.transpose(-1, -2) * scaling
    blocked = evicted.repeat_interleave(groups, 1)[:, :, None, :].expand(-1, -1, q_len, -1).clone()
    blocked |= torch.arange(n)[None, :] > (n - q_len + torch.arange(q_len))[:, None]
    logits = logits.masked_fill(blocked, float("-inf"))
    weights = logits.softmax(-1)
    return (weights @ v).transpose(1, 2).float(), weights.float()


def assert_attends_as(layer, query, expected, flash_varlen=None) -> bool:
    """The compact kernel's output, and its weights over every position (zero where freed), equal the reference;
    so does the output of the varlen path (``flash_varlen``) where the layer takes it. Returns whether it did."""
    output, weights = layer.attend(query, 0.25, with_weights=True)
    torch.testing.assert_close(output, expected[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights, expected[1], atol=1e-6, rtol=1e-4)
    output, weights = layer.attend(query, 0.25)  # without weights, the queries may be blocked
    torch.testing.assert_close(output, expected[0], atol=1e-5, rtol=1e-4)
    assert weights is None
    if flash_varlen is None or not layer.attends_varlen(query.shape[2]):
        return False
    torch.testing.assert_close(flash_varlen(layer, query, 0.25), expected[0], atol=1e-5, rtol=1e-4)
    return True


def patch_flash_kernels(monkeypatch) -> None:
    """transformers' flash-attention path with flash-attn's kernels replaced by the CPU references above."""
    import transformers.modeling_flash_attention_utils as flash_utils

    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: (
        reference_flash, reference_flash_varlen, None, flash_utils._pad_input, flash_utils._unpad_input))
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)


@pytest.fixture
def flash_varlen(monkeypatch):
    """``(layer, query, scaling) -> output``: a packed layer read by :meth:`CompactLayer.attend_varlen` through
    transformers' flash-attention entry, its kernels the CPU references."""
    from types import SimpleNamespace

    from transformers.integrations.flash_attention import flash_attention_forward

    patch_flash_kernels(monkeypatch)
    module = torch.nn.Linear(1, 1)  # an attention module as the entry reads it: config, causal, weights' dtype
    module.config, module.is_causal = SimpleNamespace(_attn_implementation="flash_attention_2"), True
    return lambda layer, query, scaling: layer.attend_varlen(flash_attention_forward, module, query, scaling)


@pytest.mark.parametrize("logits_bytes", [None, 4096])
@pytest.mark.parametrize("head_wise", [False, True])
def test_compact_attention_equals_masked_dense_attention(head_wise, logits_bytes, flash_varlen, monkeypatch):
    """Uniform and head-wise layouts, before and after holes, folds and crops; with ``logits_bytes``, the compact
    kernel's logits are capped so low that a forward of several tokens is attended one query at a time."""
    if logits_bytes is not None:
        monkeypatch.setattr("presses.compact_cache.ATTEND_LOGITS_BYTES", logits_bytes)
    torch.manual_seed(0)
    batch, heads, groups, n, dim = 2, 3, 2, 300, 16
    keys, values = torch.randn(batch, heads, n, dim), torch.randn(batch, heads, n, dim)
    scores = torch.rand(batch, heads, n)
    if head_wise:
        evicted = scores < torch.tensor([0.2, 0.5, 0.8])[None, :, None]
    else:
        evicted = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, scores[..., :200].topk(100, -1).indices, True)
    layer = CompactLayer()
    layer.update(keys[:, :, :200], values[:, :, :200])
    layer.apply_evictions(evicted[..., :200])
    assert layer.packed and layer.uniform == (not head_wise)
    assert layer.kv_bytes() < 2 * keys[:, :, :200].numel() * 4
    for start, stop in ((200, 232), (232, 233), (233, 300)):  # a question, a step, then a long stretch
        layer.update(keys[:, :, start:stop], values[:, :, start:stop])
        query = torch.randn(batch, heads * groups, stop - start, dim)
        expected = reference_attention(query, keys[:, :, :stop], values[:, :, :stop], evicted[..., :stop] & (
            torch.arange(stop) < 200), 0.25)
        assert assert_attends_as(layer, query, expected, flash_varlen) == (stop - start > 1)
    # a decoding press evicts question and old context pairs: freed, then folded into pages
    later = evicted.clone()
    later[..., 200:290] |= scores[..., 200:290] < 0.5
    layer.apply_evictions(later)
    query = torch.randn(batch, heads * groups, 1, dim)
    expected = reference_attention(query, keys, values, later, 0.25)
    assert_attends_as(layer, query, expected, flash_varlen)
    # a few context pairs: their page slots are freed in place (no repack yet), and attention skips them at once
    fewer = later.clone()
    fewer[..., :200] |= torch.rand(batch, heads, 200) < 0.04
    layer.apply_evictions(fewer)
    assert 0 < layer.holes < layer.page_positions.numel() // 4
    expected = reference_attention(query, keys, values, fewer, 0.25)
    assert_attends_as(layer, query, expected, flash_varlen)
    wide = torch.randn(batch, heads * groups, 4, dim)  # the last 4 tokens' queries, over pages with holes
    assert assert_attends_as(layer, wide, reference_attention(wide, keys, values, fewer, 0.25), flash_varlen) == (
        not bool(fewer[..., 296:].any()))  # unless one of the queries' own tokens is evicted
    evicted_own = fewer.clone()
    evicted_own[..., 297] = True  # a query's own token evicted: the varlen kernel's causal mask would count it
    layer.apply_evictions(evicted_own)
    assert not layer.attends_varlen(4) and layer.attends_varlen(2) == (not bool(fewer[..., 298:].any()))
    fewer = evicted_own
    # many context pairs and more recent ones at once: the pages are repacked, and the recent evictions survive it
    latest = fewer.clone()
    latest[..., :150] |= scores[..., :150] < 0.9
    latest[..., 290:295] = True
    layer.apply_evictions(latest)
    assert layer.recent_start == 300 and layer.recent_len == 0  # folded
    expected = reference_attention(query, keys, values, latest, 0.25)
    assert_attends_as(layer, query, expected, flash_varlen)
    logical_keys, _ = layer.logical_keys_values()
    kept = ~latest
    torch.testing.assert_close(logical_keys[kept], keys[kept])
    held = layer.kv_bytes()
    assert held == 2 * 4 * dim * layer.page_positions.numel()
    assert layer.page_positions.numel() <= int(kept.sum()) + (page_size(int(kept.sum()) / (batch * heads)) - 1) * (
        batch * heads)
    layer.crop(-100)  # back to the context: the pages' slots past it are freed, then a new question is read
    assert layer.get_seq_length() == 200
    layer.update(keys[:, :, 200:201], values[:, :, 200:201])
    query = torch.randn(batch, heads * groups, 1, dim)
    kept_context = torch.cat([latest[..., :200], torch.zeros(batch, heads, 1, dtype=torch.bool)], dim=-1)
    assert_attends_as(layer, query, reference_attention(query, keys[:, :, :201], values[:, :, :201], kept_context,
                                                        0.25))


def test_compact_cache_works_under_model_generate(kvtiny, needles):
    model, tokenizer = kvtiny
    ids = encode_prompt(tokenizer, needles[0]["context"], [needles[0]["question"]], needles[0]["answer_prefix"])
    prompt = torch.cat([ids.context_ids, ids.question_ids[0]], dim=1)
    outputs = {}
    for storage in ("mask", "compact"):
        press = build_press("snapkv", compression_ratio=0.5)
        cache = DynamicCache(config=model.config)
        with press(model, tokenizer, kv_storage=storage):
            outputs[storage] = model.generate(prompt, max_new_tokens=8, do_sample=False,
                                              **{compat.model_cache_kwarg(): cache})
        held = [type(layer).__name__ for layer in cache.layers]
        assert held == (["CompactLayer"] * 4 if storage == "compact" else ["DynamicLayer"] * 4)
    assert torch.equal(outputs["mask"], outputs["compact"])
    assert model.config._attn_implementation == "sdpa"  # restored on exit
    with pytest.raises(PressError, match="kv_storage must be"):
        with build_press("knorm", compression_ratio=0.5)(model, kv_storage="paged"):
            pass


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name, knob", [
    ("knorm", {"compression_ratio": 0.5}), ("snapkv", {"compression_ratio": 0.5}),
    ("adakv_snapkv", {"compression_ratio": 0.5}), ("kvzap_mlp", {"threshold": -4.0}), ("decoding_knorm", {})])
def test_a_left_padded_batch_answers_the_same_with_compact_and_masked_storage(kvtiny, needles, name, knob, attention):
    """The compact kernel has no attention mask: the prefill's padding keys must be freed, not attended."""
    model, tokenizer = kvtiny
    if attention == "eager":
        model, tokenizer = load_model("kvtiny", "cpu", attn_implementation="eager")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": record["context"][:length] + record[
        "question"]}], add_generation_prompt=True, tokenize=False) + record["answer_prefix"]
               for record, length in zip(needles, (None, 700), strict=True)]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert batch["attention_mask"].sum(1).tolist()[1] < batch["input_ids"].shape[1] - 100  # really padded
    outputs = {}
    for storage in ("mask", "compact"):
        cache = DynamicCache(config=model.config)
        with build_press(name, **knob)(model, tokenizer, kv_storage=storage):
            outputs[storage] = model.generate(**batch, max_new_tokens=10, do_sample=False,
                                              pad_token_id=tokenizer.pad_token_id,
                                              **{compat.model_cache_kwarg(): cache})
        if storage == "compact":
            padding = int((batch["attention_mask"] == 0).sum())
            freed = [layer.padding for layer in cache.layers]
            assert all(int(p.sum()) == padding for p in freed)  # every layer knows the padding it freed
    assert torch.equal(outputs["mask"], outputs["compact"])


@pytest.mark.parametrize("storage", ["mask", "compact"])
@pytest.mark.parametrize("make_cache", [
    lambda config: StaticCache(config=config, max_cache_len=1024),
    lambda config: QuantizedCache(backend="fp8", config=config)], ids=["static", "fp8"])
def test_a_cache_a_press_cannot_compress_is_refused_in_one_line_in_both_storages(kvtiny, needles, storage,
                                                                                 make_cache):
    """Compact storage used to swap such layers for its own, silently dropping the FP8 quantization asked for."""
    model, tokenizer = kvtiny
    ids = encode_prompt(tokenizer, needles[0]["context"], [needles[0]["question"]], needles[0]["answer_prefix"])
    try:
        cache = make_cache(model.config)
    except ValueError as error:  # FP8 quantized caches arrived after transformers 5.17
        pytest.skip(f"this transformers cannot build the cache: {error}")
    with pytest.raises(PressError, match=r"^cache layer type \w+ is not supported: use a DynamicCache$"):
        with build_press("knorm", compression_ratio=0.5)(model, tokenizer, kv_storage=storage):
            model.generate(ids.context_ids, max_new_tokens=2, do_sample=False, **{compat.model_cache_kwarg(): cache})
    assert not any(isinstance(layer, CompactLayer) for layer in cache.layers)


@pytest.mark.parametrize("generation", [
    {"do_sample": False, "prompt_lookup_num_tokens": 3},  # assisted generation: crops rejected candidates, often 0
    {"do_sample": True, "num_return_sequences": 3},
    {"do_sample": False, "num_beams": 3, "num_return_sequences": 2}],  # beam search reorders the cache's rows
    ids=["prompt_lookup", "sampling", "beam_search"])
@pytest.mark.parametrize("name", ["knorm", "adakv_snapkv"])
def test_assisted_and_sampled_generation_are_storage_independent(kvtiny, needles, name, generation):
    model, tokenizer = kvtiny
    ids = encode_prompt(tokenizer, needles[0]["context"], [needles[0]["question"]], needles[0]["answer_prefix"])
    prompt = torch.cat([ids.context_ids, ids.question_ids[0]], dim=1)
    outputs = {}
    for storage in ("mask", "compact"):
        torch.manual_seed(0)
        with build_press(name, compression_ratio=0.5)(model, tokenizer, kv_storage=storage):
            outputs[storage] = model.generate(prompt, max_new_tokens=16, **generation,
                                              **{compat.model_cache_kwarg(): DynamicCache(config=model.config)})
    assert torch.equal(outputs["mask"], outputs["compact"])


@pytest.mark.parametrize("storage", ["mask", "compact"])
@pytest.mark.parametrize("name, knob", [("knorm", {"compression_ratio": 0.5}), ("kvzap_mlp", {"threshold": -3.0})])
def test_the_press_state_follows_a_reorder_of_the_cache_rows(kvtiny, name, knob, storage):
    """Beam search reorders the cache's rows between steps: the press's evictions must move with them. Prefill rows
    (a, b), swap them, decode: the logits equal a prefill of (b, a) decoded the same way (kvzap_mlp also evicts
    while decoding, from the swapped state)."""
    model, _ = kvtiny
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 4000, (2, 300), generator=generator)
    steps = torch.randint(10, 4000, (2, 3), generator=generator)
    logits = {}
    for order, swap in (("swapped", True), ("reference", False)):
        cache = DynamicCache(config=model.config)
        press = build_press(name, **knob)
        with press(model, kv_storage=storage), torch.no_grad():
            model(prompts if swap else prompts.flip(0), **{compat.model_cache_kwarg(): cache})
            if swap:
                cache.reorder_cache(torch.tensor([1, 0]))
            outputs = [model(steps[:, i:i + 1], **{compat.model_cache_kwarg(): cache}).logits for i in range(3)]
        logits[order] = torch.cat(outputs, dim=1)
        assert press.achieved_compression_ratio > 0.3
    torch.testing.assert_close(logits["swapped"], logits["reference"], atol=1e-5, rtol=1e-5)


def test_an_offloading_cache_is_refused_by_compact_storage_in_one_line(kvtiny):
    model, _ = kvtiny
    cache = DynamicCache(config=model.config, offloading=True)
    with pytest.raises(PressError, match=r"offloading cache .*kv_storage='mask'") as error:
        with build_press("knorm", compression_ratio=0.5)(model):
            model(torch.randint(10, 4000, (1, 50)), **{compat.model_cache_kwarg(): cache})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("storage", ["mask", "compact"])
def test_a_cache_a_press_ran_on_can_be_copied_and_pickled(kvtiny, storage):
    """Users copy a prefilled cache to answer several questions, or save it: a press leaves nothing on the cache
    that cannot be deep-copied or pickled, and the copy answers like the original."""
    model, _ = kvtiny
    prompt = torch.randint(10, 4000, (1, 200), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with build_press("knorm", compression_ratio=0.5)(model, kv_storage=storage), torch.no_grad():
        model(prompt, **{compat.model_cache_kwarg(): cache})
    for copy_of in (copy.deepcopy, lambda c: pickle.loads(pickle.dumps(c))):
        duplicate = copy_of(cache)
        with torch.no_grad():
            logits = [model(torch.tensor([[5]]), **{compat.model_cache_kwarg(): c}).logits for c in (cache, duplicate)]
        compat.crop_cache(cache, 200)
        torch.testing.assert_close(logits[1], logits[0])


def test_beam_search_with_a_decoding_press_is_storage_independent(kvtiny):
    """Beams evict different pairs while decoding; reorders move each beam's evictions and buffers with it."""
    model, _ = kvtiny
    prompt = torch.randint(10, 4000, (2, 300), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for storage in ("mask", "compact"):
        press = DecodingPress(KnormPress(), compression_interval=4, target_size=200)
        with press(model, kv_storage=storage):
            outputs[storage] = model.generate(prompt, max_new_tokens=20, num_beams=3, do_sample=False,
                                              **{compat.model_cache_kwarg(): DynamicCache(config=model.config)})
        assert press.achieved_compression_ratio > 0.3
    assert torch.equal(outputs["mask"], outputs["compact"])


@pytest.mark.parametrize("head_wise", [False, True])
def test_selecting_rows_of_a_packed_layer_keeps_their_pairs(head_wise):
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 64, 8, generator=generator), torch.randn(3, 2, 64, 8, generator=generator)
    evicted = torch.rand(3, 2, 64, generator=generator) < (0.5 if head_wise else 0.0)
    if not head_wise:
        evicted[..., ::2] = True
    rows = torch.tensor([2, 0, 0, 1])
    layer = CompactLayer.from_dense(keys, values, evicted)
    layer.attend(torch.randn(3, 4, 1, 8, generator=generator), 0.3)  # builds what the kernel keeps beside the pages
    layer.batch_select_indices(rows)
    expected = CompactLayer.from_dense(keys[rows], values[rows], evicted[rows])
    assert layer.uniform == (not head_wise)
    for got, want in zip(layer.logical_keys_values(), expected.logical_keys_values(), strict=True):
        assert torch.equal(got, want)
    assert layer.kv_bytes() == expected.kv_bytes()
    query = torch.randn(4, 4, 1, 8, generator=generator)
    torch.testing.assert_close(layer.attend(query, 0.3)[0], expected.attend(query, 0.3)[0])
    # the varlen kernel's layout: one run of held pairs per (row, head), in position order
    held_keys, held_values, lengths = layer.held_pairs()
    kept = ~evicted[rows]
    assert torch.equal(lengths, kept.sum(-1).reshape(-1))
    assert torch.equal(held_keys, keys[rows][kept]) and torch.equal(held_values, values[rows][kept])


def test_eager_attention_weights_are_storage_independent(needles):
    """output_attentions under eager attention: the compact kernel returns weights over every position seen, zero
    at freed pairs, as masked eager attention does (it used to return none, and generate failed)."""
    model, tokenizer = load_model("kvtiny", "cpu", attn_implementation="eager")
    ids = encode_prompt(tokenizer, needles[0]["context"], [needles[0]["question"]], needles[0]["answer_prefix"])
    prompt = torch.cat([ids.context_ids, ids.question_ids[0]], dim=1)
    attentions = {}
    for storage in ("mask", "compact"):
        with build_press("adakv_snapkv", compression_ratio=0.5)(model, tokenizer, kv_storage=storage):
            out = model.generate(prompt, max_new_tokens=4, do_sample=False, output_attentions=True,
                                 return_dict_in_generate=True,
                                 **{compat.model_cache_kwarg(): DynamicCache(config=model.config)})
        attentions[storage] = out.attentions
    for step_mask, step_compact in zip(attentions["mask"], attentions["compact"], strict=True):
        for layer_mask, layer_compact in zip(step_mask, step_compact, strict=True):
            torch.testing.assert_close(layer_compact, layer_mask, atol=1e-6, rtol=1e-4)
    assert (attentions["compact"][-1][0] == 0).float().mean() > 0.4  # half the context's pairs are freed


def prefill_then_answer(model, tokenizer, record, press, storage: str, answer_inside: bool) -> torch.Tensor:
    """kvpress's own pattern: compress the context's cache inside the press block, answer with the cache."""
    parts = encode_prompt(tokenizer, record["context"], [record["question"]], record["answer_prefix"])
    prompt = torch.cat([parts.context_ids, parts.question_ids[0]], dim=1)
    cache = DynamicCache(config=model.config)
    generate = dict(max_new_tokens=10, do_sample=False, **{compat.model_cache_kwarg(): cache})
    with press(model, tokenizer, kv_storage=storage):
        model.model(input_ids=parts.context_ids, **{compat.model_cache_kwarg(): cache})
        if answer_inside:
            return model.generate(prompt, **generate)
    return model.generate(prompt, **generate)


@pytest.mark.parametrize("name", ["knorm", "adakv_snapkv"])
def test_a_compact_cache_stays_compressed_after_the_press_block(kvtiny, needles, name):
    """Under sdpa the packed layers are read by the compact kernel after the block too, so answering there gives
    the compressed answer (before, sdpa read only the new tokens and failed or answered wrong)."""
    model, tokenizer = kvtiny
    for record in needles:
        inside = prefill_then_answer(model, tokenizer, record, build_press(name, compression_ratio=0.5), "compact",
                                     answer_inside=True)
        after = prefill_then_answer(model, tokenizer, record, build_press(name, compression_ratio=0.5), "compact",
                                    answer_inside=False)
        masked = prefill_then_answer(model, tokenizer, record, build_press(name, compression_ratio=0.5), "mask",
                                     answer_inside=True)
        assert torch.equal(after, inside) and torch.equal(after, masked)
    assert model.config._attn_implementation == "sdpa"


def test_a_compact_cache_under_eager_attention_is_refused_after_the_press_block_in_one_line(needles):
    model, tokenizer = load_model("kvtiny", "cpu", attn_implementation="eager")
    press = build_press("knorm", compression_ratio=0.5)
    with pytest.raises(PressError, match=r"^this cache was compressed with compact storage under eager attention"):
        prefill_then_answer(model, tokenizer, needles[0], press, "compact", answer_inside=False)
    inside = prefill_then_answer(model, tokenizer, needles[0], press, "compact", answer_inside=True)  # re-entered
    assert torch.equal(inside, prefill_then_answer(model, tokenizer, needles[0], press, "mask", answer_inside=True))


FLASH_CALLS: list[tuple[str, int]] = []  # (function, longest query) of each call to the flash stand-ins


def reference_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2's ``flash_attn_varlen_func`` to its documented contract, in torch on CPU (no flash-attn here):
    sequence i is queries ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`` (tokens, heads, dim) over keys and values
    ``k``/``v`` ``[cu_seqlens_k[i]:cu_seqlens_k[i+1]]`` (tokens, kv_heads, dim), heads a multiple of kv_heads (GQA);
    causal aligned to the bottom right (query j of sq sees keys up to sk - sq + j), a ``window_size`` (left, right)
    of keys around that position (-1: unbounded); ``max_seqlen_*`` are ints."""
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
    assert dropout_p == 0.0 and block_table is None and not softcap
    assert int(cu_seqlens_q.diff().max()) <= max_seqlen_q and int(cu_seqlens_k.diff().max()) <= max_seqlen_k
    FLASH_CALLS.append(("varlen", max_seqlen_q))
    return _reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size)


def _reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size):
    """The attention both stand-ins compute (:func:`reference_flash_varlen`'s contract), recording no call."""
    out = torch.zeros_like(q)
    groups = q.shape[1] // k.shape[1]
    scale = softmax_scale or q.shape[-1] ** -0.5
    for i in range(cu_seqlens_q.numel() - 1):
        (q0, q1), (k0, k1) = cu_seqlens_q[i:i + 2].tolist(), cu_seqlens_k[i:i + 2].tolist()
        queries = q[q0:q1].transpose(0, 1).float()
        keys, values = (x[k0:k1].transpose(0, 1).repeat_interleave(groups, 0).float() for x in (k, v))
        logits = queries @ keys.transpose(-1, -2) * scale
        sq, sk = q1 - q0, k1 - k0
        key_position, query_position = torch.arange(sk)[None, :], (sk - sq + torch.arange(sq))[:, None]
        left, right = window_size
        if causal:
            right = 0
        if right >= 0:
            logits.masked_fill_(key_position > query_position + right, float("-inf"))
        if left >= 0:
            logits.masked_fill_(key_position < query_position - left, float("-inf"))
        out[q0:q1] = (logits.softmax(-1).nan_to_num(0.0) @ values).transpose(0, 1).to(q.dtype)
    return out


def reference_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2's ``flash_attn_func`` (batch, tokens, heads, dim): every row one sequence of the varlen one."""
    batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    cu = dict(dtype=torch.int32)
    cu_q, cu_k = (torch.arange(0, (batch + 1) * length, length, **cu) for length in (sq, sk))
    assert dropout_p == 0.0 and not softcap
    FLASH_CALLS.append(("dense", sq))
    out = _reference_varlen_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, softmax_scale,
                                      causal, window_size)
    return out.view(q.shape)


@pytest.fixture
def kvtiny_under_flash(monkeypatch):
    """kvtiny on transformers' own flash-attention path (its entry in the registry, the padding-free, unpadding and
    varlen branches), with flash-attn's kernels replaced by CPU references (no flash-attn here): what runs is
    transformers' flash path and the compact cache's routing around it, as on a GPU but for the kernels."""
    route_flash_to_references(monkeypatch)
    model, tokenizer = load_model("kvtiny", "cpu")
    compat.set_attn_implementation(model, "flash_attention_2")
    return model, tokenizer


def route_flash_to_references(monkeypatch) -> None:
    """flash_attention_2 in transformers' registry: its own entry, wrapped as the compact cache wraps it on import
    (where flash-attn is installed), its kernels the CPU references."""
    from transformers import AttentionInterface
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from presses.compact_cache import reading_compact_layers

    patch_flash_kernels(monkeypatch)
    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2",
                        reading_compact_layers(flash_attention_forward, varlen=True))
    assert ALL_ATTENTION_FUNCTIONS["flash_attention_2"].kernel is flash_attention_forward


@pytest.mark.parametrize("architecture", ["gemma3", "phi3"])
def test_other_architectures_under_flash_attention_answer_as_under_sdpa(architecture, monkeypatch):
    """Gemma3 (sliding-window layers beside the compressed full ones, its own query scaling) and Phi3 (fused qkv)
    read their packed layers through the varlen kernel as kvtiny does."""
    from conftest import make_model, make_tokenizer, random_ids

    tokenizer = make_tokenizer()
    answers = {}
    for attention in ("sdpa", "flash"):
        model = make_model(architecture)
        if attention == "flash":
            route_flash_to_references(monkeypatch)
            compat.set_attn_implementation(model, "flash_attention_2")
        FLASH_CALLS.clear()
        got, _ = answer_questions(model, tokenizer, random_ids(300, seed=1), [random_ids(12, seed=2)],
                                  build_press("knorm", compression_ratio=0.5), GenerationSettings(max_new_tokens=8))
        answers[attention] = [answer.token_ids for answer in got]
    assert answers["flash"] == answers["sdpa"]
    assert ("varlen", 12) in FLASH_CALLS  # the question, over the packed layers


@pytest.mark.parametrize("name, knob", [
    ("knorm", {"compression_ratio": 0.5}), ("adakv_snapkv", {"compression_ratio": 0.5}),
    ("kvzap_mlp", {"threshold": -4.0}), ("kvzip", {"compression_ratio": 0.5})])
def test_presses_run_under_flash_attention_with_compact_storage(kvtiny, kvtiny_under_flash, needles, name, knob):
    """Under flash-attention, which cannot mask, a press frees pairs (compact storage): the dense prefill runs the
    flash kernel, later forwards the compact kernel; answers equal sdpa's with masked storage."""
    for record in needles:
        FLASH_CALLS.clear()
        under_flash, measures = answer(kvtiny_under_flash, record, build_press(name, **knob), "compact")
        masked, _ = answer(kvtiny, record, build_press(name, **knob), "mask")
        assert under_flash == masked
        assert max(length for kind, length in FLASH_CALLS if kind == "dense") > 100  # the prefill ran flash
        # the questions (several tokens each) read the packed cache with the varlen kernel, the decoding steps
        # (one token each) with the compact kernel
        varlen = [length for kind, length in FLASH_CALLS if kind == "varlen"]
        assert varlen and min(varlen) > 1
        assert measures.kv_bytes_held_after_prefill < 0.8 * measures.kv_bytes_dense  # and pairs were freed
    assert kvtiny_under_flash[0].config._attn_implementation == "flash_attention_2"
    with pytest.raises(PressError, match="needs attn_implementation 'sdpa' or 'eager'"):  # flash cannot mask
        answer(kvtiny_under_flash, needles[0], build_press(name, **knob), "mask")


def test_chunked_prefill_under_flash_attention_reads_earlier_chunks_with_the_varlen_kernel(kvtiny, kvtiny_under_flash,
                                                                                           needles):
    """Each chunk after the first attends to what earlier chunks kept, through the varlen kernel: the same answers
    as sdpa (compact kernel), with no (chunk x held pairs) block of logits."""
    for record in needles:
        FLASH_CALLS.clear()
        press = build_press("kvzap_mlp", threshold=-4.0)
        under_flash, measures = answer(kvtiny_under_flash, record, press, "compact", chunk=64)
        assert under_flash == answer(kvtiny, record, build_press("kvzap_mlp", threshold=-4.0), "compact", chunk=64)[0]
        assert ("dense", 64) in FLASH_CALLS  # the first chunk
        # chunks after the first evictions (the first 128 tokens are kvzap's window), on each of the 4 layers
        assert FLASH_CALLS.count(("varlen", 64)) >= 2 * 4
        assert measures.kv_bytes_held_after_prefill < 0.8 * measures.kv_bytes_dense


def test_a_left_padded_batch_under_flash_attention_answers_as_sdpa_with_masks(kvtiny, kvtiny_under_flash, needles):
    """flash-attention hands the attention a 2D padding mask: the compact layer frees those keys too."""
    outputs = {}
    for label, (model, tokenizer), storage in (("flash", kvtiny_under_flash, "compact"), ("sdpa", kvtiny, "mask")):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": record["context"][:length] + record[
            "question"]}], add_generation_prompt=True, tokenize=False) + record["answer_prefix"]
                   for record, length in zip(needles, (None, 700), strict=True)]
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with build_press("knorm", compression_ratio=0.5)(model, tokenizer, kv_storage=storage):
            outputs[label] = model.generate(**batch, max_new_tokens=10, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id,
                                            **{compat.model_cache_kwarg(): DynamicCache(config=model.config)})
    assert torch.equal(outputs["flash"], outputs["sdpa"])


def test_the_sweep_engine_leaves_flash_attention_cells_to_the_one_at_a_time_path(kvtiny, kvtiny_under_flash):
    from evaluation.engine import engine_refusal

    press = build_press("knorm", compression_ratio=0.5)
    assert engine_refusal(kvtiny[0], press) is None
    assert engine_refusal(kvtiny_under_flash[0], press) == (
        "its shared prefill masks evicted pairs, which flash-attention cannot do")
