"""The ``kv-press-text-generation`` pipeline: compress a context once, answer one or several questions.

Usage, as on the KVzap model cards::

    import presses  # registers the pipeline
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    answer = pipe(context, question=question, press=press)["answer"]

Memory: evicted pairs are freed (``kv_storage="compact"``, the default); ``kv_storage="mask"`` keeps them
masked instead, as kvpress does, with the same answers. ``prefill_chunk_size`` prefills threshold presses (DMS,
KVzap) in chunks, evicting after each.

Prompting follows kvpress: the context goes in a user turn of the chat template (thinking off unless asked); the
template's text after the user content (end of turn, assistant header) is appended after each question, followed by
the answer prefix; only the context is compressed. Without a chat template: BOS + context, suffix "\\n".
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from presses.base_press import BasePress
from presses.generation import GenerationSettings, answer_questions


@dataclass(frozen=True)
class PromptParts:
    """Token ids of a context and of each question (question + template suffix + answer prefix), each (1, n)."""

    context_ids: torch.Tensor
    question_ids: list[torch.Tensor]


def split_chat_template(tokenizer, context: str, enable_thinking: bool = False) -> tuple[str, str]:
    """The chat-formatted context and the template suffix that closes the user turn and opens the answer."""
    if getattr(tokenizer, "chat_template", None) is None:
        return (tokenizer.bos_token or "") + context, "\n"
    separator = "#" * (len(context) + 10)  # cannot occur inside the context
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + separator}],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=enable_thinking,
    )
    formatted_context, suffix = text.split(separator)
    return formatted_context, suffix


def encode_prompt(
    tokenizer,
    context: str,
    questions: list[str],
    answer_prefix: str = "",
    max_context_length: int | None = None,
    enable_thinking: bool = False,
    query_aware: bool = False,
    delimiter: str | None = None,
) -> PromptParts:
    """Token ids for kvpress's protocol. ``query_aware`` moves the (single) question into the compressed context,
    after ``delimiter`` if given (FINCH's delimiter token, see ``BasePress.prompt_delimiter``).

    A context longer than ``max_context_length`` tokens keeps its first tokens, as kvpress does.
    """
    if query_aware:
        if len(questions) != 1:
            raise ValueError("query-aware compression needs exactly one question per context")
        context, questions = context + (delimiter or "") + questions[0], [""]
    formatted_context, suffix = split_chat_template(tokenizer, context, enable_thinking)
    context_ids = tokenizer.encode(formatted_context, add_special_tokens=False, return_tensors="pt")
    if max_context_length is not None and context_ids.shape[1] > max_context_length:
        context_ids = context_ids[:, :max_context_length]
    question_ids = [
        tokenizer.encode(question + suffix + answer_prefix, add_special_tokens=False, return_tensors="pt")
        for question in questions
    ]
    return PromptParts(context_ids, question_ids)


class KVPressTextGenerationPipeline(Pipeline):
    """Answer questions about a long context whose KV cache a press compresses (kvpress's pipeline API)."""

    def _sanitize_parameters(
        self,
        question: str | None = None,
        questions: list[str] | None = None,
        answer_prefix: str | None = None,
        press: BasePress | None = None,
        max_new_tokens: int = 50,
        max_context_length: int | None = None,
        enable_thinking: bool = False,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int = 0,
        kv_storage: str = "compact",
        prefill_chunk_size: int | None = None,
        cache=None,
        **kwargs,
    ):
        if kwargs:  # a misspelt parameter would otherwise be dropped without a word
            raise ValueError(f"unknown kv-press-text-generation parameter(s) {', '.join(sorted(kwargs))}: use "
                             f"{', '.join(SETTINGS)}")
        if cache is not None:
            raise ValueError(f"cache={type(cache).__name__}: this pipeline builds its own DynamicCache per context "
                             "(presses here read and free only DynamicCache layers, so quantized caches are not "
                             "supported); leave cache out")
        if question is not None and questions is not None:
            raise ValueError("give either question or questions, not both")
        preprocess_kwargs = {
            "questions": [question] if question is not None else (questions or [""]),
            "answer_prefix": answer_prefix or "",
            "max_context_length": max_context_length,
            "enable_thinking": enable_thinking,
        }
        settings = GenerationSettings(max_new_tokens, do_sample, temperature, top_p, top_k, min_p, seed)
        forward_kwargs = {"press": press, "settings": settings, "kv_storage": kv_storage,
                          "prefill_chunk_size": prefill_chunk_size}
        postprocess_kwargs = {"single_question": questions is None}
        return preprocess_kwargs, forward_kwargs, postprocess_kwargs

    def preprocess(self, context: str, questions: list[str], answer_prefix: str, max_context_length: int | None,
                   enable_thinking: bool) -> dict:
        parts = encode_prompt(self.tokenizer, context, questions, answer_prefix, max_context_length, enable_thinking)
        return {"context_ids": parts.context_ids, "question_ids": parts.question_ids}

    def _forward(self, model_inputs: dict, press: BasePress | None, settings: GenerationSettings,
                 kv_storage: str = "compact", prefill_chunk_size: int | None = None) -> dict:
        device = self.model.device
        answers, ratio = answer_questions(
            self.model,
            self.tokenizer,
            model_inputs["context_ids"].to(device),
            [ids.to(device) for ids in model_inputs["question_ids"]],
            press,
            settings,
            kv_storage,
            prefill_chunk_size,
        )
        return {"answers": [a.text for a in answers], "compression_ratio": ratio}

    def postprocess(self, model_outputs: dict, single_question: bool) -> dict:
        if single_question:
            return {"answer": model_outputs["answers"][0]}
        return {"answers": model_outputs["answers"]}

    # The pipeline base moves tensors between devices and batches; we do our own (one context at a time).
    def forward(self, model_inputs, **forward_params):
        with torch.no_grad():
            return self._forward(model_inputs, **forward_params)


SETTINGS = tuple(name for name in inspect.signature(KVPressTextGenerationPipeline._sanitize_parameters).parameters
                 if name not in ("self", "cache", "kwargs"))


def register_pipeline() -> None:
    """Register ``kv-press-text-generation`` with transformers (idempotent)."""
    if "kv-press-text-generation" not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            "kv-press-text-generation",
            pipeline_class=KVPressTextGenerationPipeline,
            pt_model=AutoModelForCausalLM,
        )
