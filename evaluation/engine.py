"""How a sweep's cells execute: one prefill per context for every cell, answers decoded in batches.

The runner plans (grid, run ids, folders, caches); this module executes. For each context (with the questions that
share it) the sweep engine runs **one** dense prefill with the press of every cell attached: in a dense prefill the
pruning of one layer does not change the hidden states of later layers, so each press decides its evictions from
the same layer inputs it would see alone. A press that needs extra passes (KVzip's reconstruction) runs them once
per context for every ratio (``BasePress.shared_work_key``). Then every (cell, question, sample) is one row of
:class:`presses.batched_decoding.BatchedDecoder`: rows from any context share batches, a finished row's slot is
refilled at once, and the context's keys and values are stored once for all its rows.

Predictions are appended and fsynced as each row finishes, so a kill loses at most the rows in flight; a rerun skips
every cached (cell, question, sample) and prefills only contexts with work left. ``--engine sequential`` keeps the
one-at-a-time path (prefill and answer per cell and context), for comparison.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import DynamicCache

from evaluation.cache import PredictionCache
from evaluation.config import EvalConfig
from evaluation.datasets.registry import get_dataset
from presses import BasePress, GenerationSettings, answer_questions, compat
from presses.batched_decoding import BatchedDecoder, Row, SharedContext
from presses.compact_cache import packed_kv_bytes
from presses.generation import Measures, device_clock, eos_token_ids, per_token_kv_bytes
from presses.pipeline import PromptParts, encode_prompt

logger = logging.getLogger("kvpress-eval")
CPU_BATCH_SIZE = 32  # measured on kvtiny, 2 cores (README "How a sweep executes")


def generation_settings(config: EvalConfig, max_new_tokens: int, sample_index: int = 0) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=config.max_new_tokens or max_new_tokens, do_sample=config.do_sample,
                              temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                              min_p=config.min_p, seed=config.seed + 1000 * sample_index)


def truncate_context(ids: torch.Tensor, max_length: int | None, how: str) -> torch.Tensor:
    """Keep the first ``max_length`` tokens (kvpress) or the first and last halves (LongBench's middle cut)."""
    if max_length is None or ids.shape[1] <= max_length:
        return ids
    if how == "middle":
        half = max_length // 2
        return torch.cat([ids[:, :half], ids[:, ids.shape[1] - (max_length - half):]], dim=1)
    return ids[:, :max_length]


def group_by_context(records: list[dict], query_aware: bool) -> list[list[dict]]:
    """Questions sharing a context (and answer prefix) are answered from one prefill; query-aware: one each."""
    if query_aware:
        return [[record] for record in records]
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["context"], record["answer_prefix"]), []).append(record)
    return list(groups.values())


def prediction_record(record: dict, sample_index: int, config: EvalConfig, prediction: str, tokens: list[int],
                      context_ratio: float, answer_ratio: float, context_length: int, question_length: int,
                      cost: dict | None = None) -> dict:
    """The line a prediction adds to its run's predictions.jsonl (the same for every engine). ``cost``: what the
    answer cost (:func:`answer_cost`)."""
    return {**(cost or {}), "sample_id": sample_key(record, sample_index, config), "problem_id": record["sample_id"],
            "task": record["task"], "question": record["question"], "answer_prefix": record["answer_prefix"],
            "answer": record["answer"], "prediction": prediction,
            "compression_ratio": context_ratio, "answer_compression_ratio": answer_ratio,
            "context_length": context_length, "question_length": question_length,
            "generated_length": len(tokens), "sample_index": sample_index,
            **{k: record[k] for k in ("all_classes", "length", "needle_length", "needle_depth") if k in record}}


def answer_cost(kv_storage: str, kv_bytes_dense: int, held_after_prefill: int, held_end: int, peak: int,
                prefill_seconds: float, decode_seconds: float, throughput_scope: str, held_source: str,
                device_peak: int | None = None) -> dict:
    """The memory and speed fields of a prediction record. ``prefill_seconds`` is set on the first answer of a
    context only (0 on the others), so sums over answers count each prefill once. ``held_source``: ``cache`` (read
    from the cache that answered) or ``layout`` (the sweep engine: computed from the press's masks by the packing's
    rule, which is what its compact cache holds). ``device_peak``: the CUDA allocator's peak over the context, on a
    GPU and one context at a time only (the sweep engine's rows share their memory)."""
    cost = {"kv_storage": kv_storage, "kv_bytes_held_source": held_source, "kv_bytes_dense": kv_bytes_dense,
            "kv_bytes_held_after_prefill": held_after_prefill, "kv_bytes_held_end": held_end, "kv_bytes_peak": peak,
            "prefill_seconds": prefill_seconds, "decode_seconds": decode_seconds, "throughput_scope": throughput_scope}
    if device_peak is not None:
        cost["device_peak_bytes"] = device_peak
    return cost


def encode_group(tokenizer, group: list[dict], config: EvalConfig, truncation: str, device,
                 delimiter: str | None = None) -> PromptParts:
    """Token ids of a group's shared context (truncated as the dataset says) and of each of its questions;
    ``delimiter`` goes between the context and a query-aware question (a press's ``prompt_delimiter``)."""
    parts = encode_prompt(tokenizer, group[0]["context"], [r["question"] for r in group], group[0]["answer_prefix"],
                          None, config.enable_thinking, config.query_aware, delimiter)
    context_ids = truncate_context(parts.context_ids, config.max_context_length, truncation).to(device)
    return PromptParts(context_ids, [q.to(device) for q in parts.question_ids])


def seed_context(config: EvalConfig, group: list[dict], sample_index: int) -> None:
    """Seed torch's global generator for one context and sample: presses that draw random numbers (random) then
    decide the same way whatever ran before, so resumed runs equal uninterrupted ones."""
    torch.manual_seed(zlib.crc32(f"{config.seed}:{group[0]['sample_id']}:{sample_index}".encode()))


def answer_group(model, tokenizer, group: list[dict], press, config: EvalConfig, sample_index: int,
                 truncation: str, prefill_chunk_size: int | None = None) -> list[dict]:
    """The one-at-a-time path: prefill one context under ``press`` (its state is reset on entry), answer its
    questions; one prediction record per question."""
    parts = encode_group(tokenizer, group, config, truncation, next(model.parameters()).device,
                         press.prompt_delimiter(tokenizer) if config.query_aware else None)
    seed_context(config, group, sample_index)
    settings = generation_settings(config, max(r["max_new_tokens"] for r in group), sample_index)
    measures = Measures()
    answers, ratio = answer_questions(model, tokenizer, parts.context_ids, parts.question_ids, press, settings,
                                      config.kv_storage, prefill_chunk_size, measures)
    storage = press.storage_for(model) if config.kv_storage == "compact" else "mask"
    per_answer = measures.decode_seconds / max(1, len(answers))  # answers of a context decode one after another
    return [prediction_record(record, sample_index, config, answer.text, answer.token_ids, ratio,
                              answer.compression_ratio, int(parts.context_ids.shape[1]), int(question.shape[1]),
                              answer_cost(storage, measures.kv_bytes_dense, measures.kv_bytes_held_after_prefill,
                                          held_end, measures.kv_bytes_peak,
                                          measures.prefill_seconds if index == 0 else 0.0, per_answer, "run",
                                          "cache", measures.device_peak_bytes))
            for index, (record, answer, question, held_end) in enumerate(zip(
                group, answers, parts.question_ids, measures.kv_bytes_held_end, strict=True))]


def sample_key(record: dict, sample_index: int, config: EvalConfig) -> str:
    return record["sample_id"] if config.num_samples == 1 else f"{record['sample_id']}#{sample_index}"


@dataclass
class PreparedRun:
    """One cell of the sweep, ready to execute: its press, its open cache and what the cache already holds.

    ``spec`` is the plan's own description of the cell (opaque here); ``label`` names it in logs.
    """

    spec: object
    label: str
    dataset: str
    press: BasePress
    folder: Path
    cache: PredictionCache
    done: dict[str, dict]
    new_press: Callable[[], BasePress]  # a fresh press of this cell (the engine needs one per sample index)
    prefill_chunk_size: int | None = None  # chunked prefill (threshold presses; one context at a time)

    def missing(self, group: list[dict], sample_index: int, config: EvalConfig) -> list[int]:
        """Indices of the group's questions whose prediction for ``sample_index`` is not cached yet."""
        return [i for i, record in enumerate(group) if sample_key(record, sample_index, config) not in self.done]

    def save(self, prediction: dict) -> None:
        """Append and fsync one prediction (once)."""
        if prediction["sample_id"] not in self.done:
            self.cache.append(prediction)
            self.done[prediction["sample_id"]] = prediction


def execute_sequentially(model, tokenizer, records: list[dict], run: PreparedRun, config: EvalConfig,
                         progress: tqdm) -> None:
    """The one-at-a-time path (``--engine sequential``): every context prefilled and answered per cell."""
    truncation = get_dataset(run.dataset).truncation
    for group in group_by_context(records, config.query_aware):
        for sample_index in range(config.num_samples):
            if not run.missing(group, sample_index, config):
                continue
            for prediction in answer_group(model, tokenizer, group, run.press, config, sample_index, truncation,
                                           run.prefill_chunk_size):
                if prediction["sample_id"] not in run.done:
                    run.save(prediction)
                    progress.update()



def engine_refusal(model: nn.Module, press: BasePress, kv_storage: str = "compact",
                   chunked_prefill: bool = False) -> str | None:
    """Why a cell cannot share the engine's prefill and batched decoding (it then runs one context at a time)."""
    if len(compat.attention_modules(model)) != len(compat.decoder_layers(model)):
        return "the model has sliding-window layers"
    if compat.attn_implementation(compat.attention_modules(model)[0]) not in compat.MASKING_IMPLEMENTATIONS:
        return "its shared prefill masks evicted pairs, which flash-attention cannot do"
    if getattr(press, "rewrites_cache", False):
        return "the press rewrites cached keys or values"
    if press.needs_question:
        return "the press reads its question from a prompt of its own"
    if chunked_prefill:
        return "it prefills in chunks"
    if kv_storage == "compact" and press.compresses_while_decoding:
        return "the press evicts while decoding: each answer needs a compact cache of its own"
    return None


def default_batch_size(model: nn.Module, context_length: int, answer_tokens: int) -> int:
    """Rows decoded together: a measured constant on CPU; on GPU, what half the free memory holds.

    A row holds its own tokens' keys and values, and a step's attention logits against its context take
    (heads x context_length) float32 per layer, computed one layer at a time.
    """
    parameter = next(model.parameters())
    if parameter.device.type != "cuda":
        return CPU_BATCH_SIZE
    config = compat.text_config(model)
    own = per_token_kv_bytes(model) * answer_tokens
    logits = 3 * config.num_attention_heads * context_length * 4
    free, _ = torch.cuda.mem_get_info(parameter.device)
    return int(max(1, min(512, free // 2 // (own + logits))))


@dataclass
class _Instance:
    """One press of one cell for one sample index, attached to the shared prefill."""

    run: PreparedRun
    sample_index: int
    press: BasePress


def execute(model: nn.Module, tokenizer, records: list[dict], runs: list[PreparedRun], config: EvalConfig,
            progress: tqdm) -> None:
    """Answer every missing (cell, question, sample) of ``runs`` (one dataset) with shared prefills."""
    groups = [group for group in group_by_context(records, config.query_aware)
              if any(run.missing(group, k, config) for run in runs for k in range(config.num_samples))]
    if not groups:
        return
    truncation = get_dataset(runs[0].dataset).truncation
    device = next(model.parameters()).device
    instances = [_Instance(run, k, run.press if k == 0 else run.new_press())
                 for k in range(config.num_samples) for run in runs]
    eos_ids = eos_token_ids(model, tokenizer)
    longest = max(len(g[0]["context"]) for g in groups) // 2  # tokens, bounded above by characters / 2
    batch_size = config.batch_size or default_batch_size(model, longest, config.max_new_tokens or 256)
    decoder = BatchedDecoder(model, eos_ids, batch_size)
    with ExitStack() as stack:
        for instance in instances:
            # the dense prefill is shared: each press masks, and its rows get a compact copy below
            stack.enter_context(instance.press(model, tokenizer, kv_storage="mask"))
        rows = _rows(model, tokenizer, groups, instances, config, truncation, device)
        token_bytes = per_token_kv_bytes(model)
        for row in decoder.run(rows):
            instance, group, question_index, context_ratio, context_length, cost = row.payload
            record = group[question_index]
            text = tokenizer.decode(row.tokens, skip_special_tokens=True)
            answer_ratio = context_ratio if row.compression_ratio is None else row.compression_ratio
            own_tokens = len(row.prompt_ids) + len(row.tokens) - 1  # the last token is never fed back
            held_end = cost["kv_bytes_held_after_prefill"] + own_tokens * token_bytes
            instance.run.save(prediction_record(record, instance.sample_index, config, text, row.tokens,
                                                context_ratio, answer_ratio, context_length,
                                                len(row.prompt_ids), {**cost, "kv_bytes_held_end": held_end,
                                                                      "decode_seconds": row.decode_seconds}))
            progress.update()


def _rows(model: nn.Module, tokenizer, groups: list[list[dict]], instances: list[_Instance], config: EvalConfig,
          truncation: str, device) -> Iterator[Row]:
    """Rows context by context; a context is prefilled (once, every waiting press attached) when its turn comes."""
    n_layers = len(compat.decoder_layers(model))
    head_dim = compat.head_dim(compat.attention_modules(model)[0])
    element_size = next(model.parameters()).element_size()
    for group in groups:
        waiting = [(instance, instance.run.missing(group, instance.sample_index, config)) for instance in instances]
        waiting = [(instance, questions) for instance, questions in waiting if questions]
        if not waiting:
            continue
        parts = encode_group(tokenizer, group, config, truncation, device)
        start = device_clock(device)
        prefilled = _prefill(model, parts.context_ids, group, [instance for instance, _ in waiting], instances,
                             config)
        context = SharedContext.from_cache(prefilled, n_layers)
        del prefilled
        prefill_seconds = device_clock(device) - start
        dense_bytes = context.kv_bytes()
        no_evictions = torch.zeros((1, *context.keys[0].shape[:2]), dtype=torch.bool, device=device)
        settings = {k: generation_settings(config, max(r["max_new_tokens"] for r in group), k)
                    for k in range(config.num_samples)}
        for instance, questions in waiting:
            press = instance.press
            masks = [_context_mask(press, layer) for layer in range(n_layers)]
            ratio = press.achieved_compression_ratio
            decoding = press.compresses_while_decoding
            sampling = settings[instance.sample_index]
            # The rows read the shared dense context through the press's masks (measured faster than a compact copy
            # per press: README, "How memory is held"); what the press's compact cache holds is computed from the
            # masks by the packing's own rule.
            held = dense_bytes
            if config.kv_storage == "compact":
                held = sum(packed_kv_bytes(mask[None] if mask is not None else no_evictions, head_dim, element_size)
                           for mask in masks)
            for number, question_index in enumerate(questions):
                generator = None
                if sampling.do_sample:
                    generator = torch.Generator(device=device).manual_seed(sampling.seed + question_index)
                # the shared prefill served every press: each cell's first answer of the context carries its time
                cost = answer_cost(config.kv_storage, dense_bytes, held, 0, dense_bytes,
                                   prefill_seconds if number == 0 else 0.0, 0.0, "sweep", "layout")
                yield Row(context, parts.question_ids[question_index][0].tolist(),
                          list(masks), sampling.max_new_tokens, sampling if sampling.do_sample else None, generator,
                          press if decoding else None, press.snapshot() if decoding else None,
                          (instance, group, question_index, ratio, int(parts.context_ids.shape[1]), cost))


def _prefill(model: nn.Module, context_ids: torch.Tensor, group: list[dict], instances: list[_Instance],
             everyone: list[_Instance], config: EvalConfig):
    """One dense prefill of the context with every waiting press attached; returns the dense cache.

    Presses of cells with nothing left to answer for this context stay attached but inactive.
    """
    waiting = {id(instance.press) for instance in instances}
    for instance in everyone:
        instance.press.hooks_active = id(instance.press) in waiting
    for k in sorted({instance.sample_index for instance in instances}):
        seed_context(config, group, k)
        for instance in instances:
            if instance.sample_index == k:
                instance.press.reset()
    shared: dict = {}
    for instance in instances:
        key = instance.press.shared_work_key()
        instance.press.shared_work = None if key is None else shared.setdefault(key, {})
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=context_ids, **{compat.model_cache_kwarg(): cache}, use_cache=True)
    for instance in everyone:
        instance.press.shared_work = None
        instance.press.hooks_active = True
    return cache


def _context_mask(press: BasePress, layer: int) -> torch.Tensor | None:
    """The press's eviction mask of a layer over the context, (kv_heads, n), or None where nothing is evicted."""
    mask = press.evicted_mask(layer)
    if mask is None or not bool(mask.any()):
        return None
    return mask[0]
