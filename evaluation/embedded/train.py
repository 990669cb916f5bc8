"""Train kvpress-eval's embedded default model from nothing but code, on a CPU.

    python -m evaluation.embedded.train --output_dir runs/kvtiny          # phase 1 (kvtiny v1); resumes if interrupted
    python -m evaluation.embedded.train --output_dir /tmp/smoke --smoke   # seconds: a tiny end-to-end check
    python -m evaluation.embedded.train --output_dir runs/kvtiny-phase2 \
        --init_from evaluation/embedded/experiments/kvtiny-v1 \
        --long_stages '[[1024, 250], [2048, 450], [4096, 900]]'         # phase 2 alone, one run
    python -m evaluation.embedded.train recipe --recipe evaluation/embedded/recipes/kvtiny-4k.yaml \
        --output_dir runs/kvtiny-4k                                     # several runs, each from the last one's weights

What it builds, in order:
1. a byte-level BPE tokenizer (digits are single tokens, so a 7-digit value is 7 tokens) trained on text from the
   project's RULER generator, with a ChatML chat template, saved so ``AutoTokenizer.from_pretrained`` loads it;
2. a small ``Qwen3ForCausalLM`` with grouped-query attention (more query heads than KV heads);
3. training on RULER-style tasks made by the same generator the evaluation uses (needles over noise and needle
   haystacks, variable tracking, common and frequent words) plus a copy task in KVzip's exact repeat format
   ("Repeat the previous context exactly."), with a curriculum from short to long contexts. The loss is on the
   answer tokens; the copy task's answer is its whole context, a dense signal that helps induction heads appear;
4. optionally (``long_stages``, empty by default), a second phase that extends the model to longer contexts: a
   fresh warmup and cosine schedule at a lower learning rate, multi-key retrieval weighted up, and a ``replay``
   share of steps at shorter lengths against forgetting the short ones.
   ``rope_scaling`` (e.g. YaRN) changes the model's RoPE for the run, phase 1's weights included.
   ``--init_from`` a directory holding phase 1's weights (the 1,024-token kvtiny v1) skips phase 1: the run
   starts at phase 2's first step with the same data and fresh optimizer state it would have had after training
   phase 1 itself (sampler and optimizer are renewed at the phase boundary in both cases).

The shipped kvtiny (v2, 4,096 tokens) is phase 1 (kvtiny v1, kept in ``experiments/kvtiny-v1``) followed by the
five phase-2 runs of ``recipes/kvtiny-4k.yaml``.

Everything is seeded; a checkpoint is written every ``checkpoint_every`` steps and a rerun resumes from it.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fire
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from evaluation.config import ConfigError, read_yaml
from evaluation.datasets.ruler_synthetic import common_words, generate_task, get_task
from evaluation.metrics.ruler import string_match_all

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly."
COPY_TASK = "copy"


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved beside the model as ``train_config.json``)."""

    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 10000.0
    # Extra RoPE parameters merged over the default rotation, e.g. {"rope_type": "yarn", "factor": 4.0,
    # "original_max_position_embeddings": 1024} to extend a 1,024-token model: YaRN interpolates the low frequencies
    # and sharpens attention (its temperature), which a long context's many distractors need. Empty: plain RoPE.
    rope_scaling: dict = field(default_factory=dict)
    # (context length in tokens, optimizer steps) per curriculum stage, short to long.
    stages: list = field(default_factory=lambda: [[128, 1000], [256, 1500], [512, 1500], [1024, 2000]])
    tokens_per_batch: int = 4096
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 200
    weight_decay: float = 0.1
    task_weights: dict = field(default_factory=lambda: {
        "niah_single_1": 3, "niah_multikey_2": 2, "niah_multikey_3": 1, "vt": 2, "cwe": 1, "fwe": 1, COPY_TASK: 3,
    })
    pool_size: int = 32  # records generated at once per (task, length); each is used once
    checkpoint_every: int = 100
    eval_every: int = 500
    eval_samples: int = 20
    tokenizer_corpus_samples: int = 40
    # Phase 2, after ``stages``: (length, steps) stages with their own warmup and cosine schedule from
    # ``long_learning_rate`` (lower than phase 1's: it refines a trained model) down to ``min_learning_rate``.
    # Empty by default: the runs tried (README, "Towards 4,096 tokens") cost too much at 1,024 tokens to ship.
    long_stages: list = field(default_factory=list)
    long_learning_rate: float = 5e-4
    long_warmup_steps: int = 50
    # Multi-key retrieval was the weak task at 1,024 tokens (82 against a target of 90): weighted up in phase 2.
    long_task_weights: dict = field(default_factory=lambda: {
        "niah_single_1": 2, "niah_multikey_2": 4, "niah_multikey_3": 1, "vt": 2, "cwe": 1, "fwe": 1, COPY_TASK: 3,
    })
    # Share of phase-2 steps drawn at a shorter length (one of ``replay_lengths`` below the stage's length, uniformly),
    # so that training at 4,096 tokens does not trade away the 1,024-token behaviour.
    replay: float = 0.3
    replay_lengths: list = field(default_factory=lambda: [1024, 2048])
    # Average the loss per example, then over the batch, instead of over all answer tokens of the batch. A copy
    # answer has as many tokens as its context (hundreds to thousands) and a retrieval answer about ten, so a
    # token mean gives a batch's needles almost no weight beside one copy. False reproduces the shipped kvtiny.
    loss_per_example: bool = False
    # Share of multi-key retrieval records whose first answer lies in the context's first third (the generator puts
    # needles at uniform depth: a third). At 4,096 tokens the misses are needles 3,000+ tokens before the question;
    # a larger share trains on them more often. None keeps the generator's uniform depths (the shipped kvtiny).
    far_needle_share: float | None = None

    def __post_init__(self) -> None:
        if self.far_needle_share is not None and not 0 < self.far_needle_share <= 1:
            raise ConfigError(f"--far_needle_share {self.far_needle_share} is not a share: give a number in (0, 1], "
                              "or leave it out for the generator's uniform depths")
        if not 0 <= self.replay <= 1:
            raise ConfigError(f"--replay {self.replay} is not a share: give a number in [0, 1]")


SMOKE = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
             head_dim=16, stages=[[512, 3], [768, 2]], tokens_per_batch=512, warmup_steps=1, checkpoint_every=2,
             eval_every=5, eval_samples=1, pool_size=2, tokenizer_corpus_samples=2, long_warmup_steps=1,
             replay_lengths=[512])


class WhitespaceCounter:
    """Stand-in tokenizer (one token per word) used to size the tokenizer's training corpus."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return text.split()


def build_tokenizer(config: TrainConfig) -> PreTrainedTokenizerFast:
    """Train the BPE tokenizer on generator text: every task at a few lengths, plus the repeat instruction."""
    corpus = []
    for task in (t for t in config.task_weights if t != COPY_TASK):
        for length in (700, 1200):
            for record in generate_task(task, WhitespaceCounter(), length, config.tokenizer_corpus_samples,
                                        seed=config.seed + 1000):
                corpus.append(record["context"] + record["question"] + record["answer_prefix"] + " "
                              + " ".join(record["answer"]) + REPEAT_INSTRUCTION)
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    return tokenizer


def build_model(config: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    model_config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, **config.rope_scaling},
        tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    return Qwen3ForCausalLM(model_config)


def answer_text(record: dict) -> str:
    """The reference answer as the model should write it after the answer prefix."""
    return " " + ", ".join(record["answer"]) + "."


def encode_example(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """(token ids, loss mask: 1 on answer tokens) for one record, in kvpress's prompt protocol."""
    if record["task"] == COPY_TASK:
        prompt_text, target_text = record["context"] + REPEAT_INSTRUCTION, record["context"]
        prefix = ""
    else:
        prompt_text, target_text = record["context"] + record["question"], answer_text(record)
        prefix = record["answer_prefix"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt_text}], add_generation_prompt=True,
                                           tokenize=False) + prefix
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    target_ids = tokenizer.encode(target_text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids + target_ids, [0] * len(prompt_ids) + [1] * len(target_ids)


COPY_SOURCES = ("niah_single_1", "niah_multikey_2", "vt", "fwe")


def prompt_records(task: str, tokenizer, prompt_tokens: int, n: int, seed: int) -> list[dict]:
    """Generator records whose prompt has about ``prompt_tokens`` tokens.

    The generator's length budget also reserves the task's answer tokens (128 for NIAH); adding them back keeps
    every task near the stage's length instead of silently dropping NIAH from short stages.
    """
    return generate_task(task, tokenizer, prompt_tokens + get_task(task).max_new_tokens, n, seed=seed)


def is_far_needle(record: dict) -> bool:
    """Whether the record's first answer lies in the first third of its context (farthest from the question)."""
    return 0 <= record["context"].find(record["answer"][0]) < len(record["context"]) / 3


class TaskSampler:
    """Draws records by task weight; records come from the RULER generator in pools, each used once.

    A task whose smallest prompt does not fit a stage's length (cwe below ~700 tokens) is left out of that stage;
    :meth:`active_tasks` says which tasks a stage really trains on (logged at each stage's first step).
    """

    def __init__(self, config: TrainConfig, tokenizer, seed: int, task_weights: dict | None = None) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.random = random.Random(seed)
        self.pools: dict[tuple[str, int], list[dict]] = {}
        weights = config.task_weights if task_weights is None else task_weights
        self.tasks = list(weights)
        self.weights = [weights[t] for t in self.tasks]
        self.too_long: set[tuple[str, int]] = set()

    def _draw(self, task: str, length: int) -> dict:
        pool = self.pools.setdefault((task, length), [])
        while not pool:
            records = prompt_records(task, self.tokenizer, length, self.config.pool_size,
                                     seed=self.random.randrange(2**31))
            pool.extend(self._resample_depths(task, records))
            self.random.shuffle(pool)
        return pool.pop()

    def _resample_depths(self, task: str, records: list[dict]) -> list[dict]:
        """Keep every far-needle record and a share of the others, so far ones make ``far_needle_share`` of them."""
        share = self.config.far_needle_share
        if share is None or not task.startswith("niah_multikey"):
            return records
        # Uniform depths put a third in the first third: keeping the others with probability (1 - s) / (2 s)
        # makes the far ones a share s of what is kept.
        keep_near = min(1.0, (1 - share) / (2 * share))
        return [r for r in records if is_far_needle(r) or self.random.random() < keep_near]

    def active_tasks(self, length: int) -> list[str]:
        return [t for t in self.tasks if (t, length) not in self.too_long]

    def sample(self, length: int) -> dict:
        available = [(t, w) for t, w in zip(self.tasks, self.weights, strict=True) if (t, length) not in self.too_long]
        if not available:
            raise ValueError(f"no training task fits {length} tokens")
        task = self.random.choices([t for t, _ in available], [w for _, w in available])[0]
        if task != COPY_TASK:
            try:
                return self._draw(task, length)
            except ValueError:  # the task's smallest prompt does not fit this length
                self.too_long.add((task, length))
                return self.sample(length)
        # The repetition takes as many tokens as the context: half the stage's length each. Half the copies are of
        # random words and numbers, which only an induction mechanism (find the previous occurrence, copy what
        # followed) can predict; copies of RULER haystacks are mostly predictable noise and teach little of it.
        if self.random.random() < 0.5:
            return self._copy(random_text(self.tokenizer, length // 2, self.random))
        sources = [t for t in COPY_SOURCES if (t, length // 2) not in self.too_long]
        while sources:
            source = self.random.choice(sources)
            try:
                record = self._draw(source, length // 2)
            except ValueError:
                self.too_long.add((source, length // 2))
                sources.remove(source)
                continue
            return self._copy(record["context"])
        return self._copy(random_text(self.tokenizer, length // 2, self.random))

    @staticmethod
    def _copy(context: str) -> dict:
        return {"task": COPY_TASK, "context": context, "question": "", "answer_prefix": "", "answer": []}


def random_text(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """About ``n_tokens`` tokens of random words (RULER's word lists) and 7-digit numbers, in lines of a few."""
    vocabulary = common_words()
    pieces: list[str] = []
    while len(tokenizer.encode(" ".join(pieces), add_special_tokens=False)) < n_tokens:
        line = [rng.choice(vocabulary) if rng.random() < 0.7 else str(rng.randrange(10**6, 10**7))
                for _ in range(rng.randint(2, 6))]
        pieces.append(" ".join(line) + ".\n")
    return " ".join(pieces).strip()


def make_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    answer_mask = torch.zeros(len(examples), width)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        answer_mask[row, : len(ids)] = torch.tensor(mask, dtype=torch.float)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "answer_mask": answer_mask, "attention_mask": attention_mask}


def batch_loss(model, batch: dict[str, torch.Tensor], per_example: bool = False) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy on the answer tokens, and the argmax accuracy there.

    Only answer positions go through the output layer: on long prompts with short answers that is most of the
    compute saved. The copy task's answer is its whole context, which gives a dense signal. ``per_example``: the
    mean of each example's mean, so that a long copy answer does not outweigh the batch's short answers.
    """
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    predicts_answer = batch["answer_mask"][:, 1:].bool()
    logits = model.lm_head(hidden[:, :-1][predicts_answer]).float()
    targets = batch["input_ids"][:, 1:][predicts_answer]
    if per_example:
        token_losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        rows = predicts_answer.nonzero()[:, 0]  # the example of each answer token, in the same (row-major) order
        per_row = torch.zeros(predicts_answer.shape[0]).index_add_(0, rows, token_losses)
        answers_per_row = predicts_answer.sum(1)
        loss = (per_row[answers_per_row > 0] / answers_per_row[answers_per_row > 0]).mean()
    else:
        loss = torch.nn.functional.cross_entropy(logits, targets)
    accuracy = float((logits.argmax(-1) == targets).float().mean())
    return loss, accuracy


def phase_one_steps(config: TrainConfig) -> int:
    return sum(steps for _, steps in config.stages)


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Warmup then cosine, per phase: phase 2 (``long_stages``) restarts it from ``long_learning_rate``."""
    peak, warmup, first = config.learning_rate, config.warmup_steps, phase_one_steps(config)
    if step >= first:
        peak, warmup, step, total_steps = config.long_learning_rate, config.long_warmup_steps, step - first, \
            total_steps - first
    else:
        total_steps = min(total_steps, first)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_learning_rate + (peak - config.min_learning_rate) * cosine


def stage_of(config: TrainConfig, step: int) -> int:
    """Context length of the curriculum stage (phase 1, then phase 2) that ``step`` falls in."""
    stages = config.stages + config.long_stages
    for length, steps in stages:
        if step < steps:
            return length
        step -= steps
    return stages[-1][0]


def step_length(config: TrainConfig, step: int) -> int:
    """The context length trained at ``step``: its stage's, or in phase 2 a shorter replayed one.

    The replay draw depends on (seed, step) only, so a resumed run makes the same choices.
    """
    length = stage_of(config, step)
    shorter = [x for x in config.replay_lengths if x < length]
    if step < phase_one_steps(config) or not shorter:
        return length
    draw = random.Random(config.seed * 1_000_003 + step)
    return draw.choice(shorter) if draw.random() < config.replay else length


def make_sampler(config: TrainConfig, tokenizer, step: int) -> TaskSampler:
    """The task sampler for a run (re)starting at ``step``; phase 2 uses its own task weights."""
    long = step >= phase_one_steps(config)
    return TaskSampler(config, tokenizer, seed=config.seed + step,
                       task_weights=config.long_task_weights if long else None)


def load_weights(model: Qwen3ForCausalLM, directory: Path) -> None:
    """Load a saved model's weights into ``model``; the architecture must match (shapes are checked)."""
    state = load_file(str(directory / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The output layer is tied to the embeddings, so a saved model may leave it out.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{directory} does not match the configured model: missing {missing}, "
                         f"unexpected {unexpected}")
    model.tie_weights()


@torch.no_grad()
def evaluate(model, tokenizer, tasks: list[str], length: int, n_samples: int, seed: int) -> dict[str, float | None]:
    """Greedy exact-answer accuracy (RULER string_match_all, x100) per task; copy: teacher-forced token accuracy.

    ``length`` is the prompt's length in tokens; a task whose smallest prompt does not fit it scores None.
    """
    model.eval()
    results = {}
    sampler = TaskSampler(TrainConfig(pool_size=n_samples), tokenizer, seed)
    for task in tasks:
        if task == COPY_TASK:
            sampler.tasks, sampler.weights = [COPY_TASK], [1]
            records = [sampler.sample(length) for _ in range(n_samples)]
            accuracies = [batch_loss(model, make_batch([encode_example(tokenizer, r)], tokenizer.pad_token_id))[1]
                          for r in records]
            results[task] = 100 * sum(accuracies) / len(accuracies)
            continue
        try:
            records = prompt_records(task, tokenizer, length, n_samples, seed=seed)
        except ValueError:  # the task's smallest prompt does not fit this length
            results[task] = None
            continue
        scores = []
        for record in records:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": record["context"] + record["question"]}], add_generation_prompt=True,
                tokenize=False) + record["answer_prefix"]
            ids = tokenizer.encode(prompt, add_special_tokens=False, return_tensors="pt")
            output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=record["max_new_tokens"],
                                    do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)
            prediction = tokenizer.decode(output[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
            scores.append(string_match_all(prediction, record["answer"]))
        results[task] = 100 * sum(scores) / len(scores)
    model.train()
    return results


def train(output_dir: str, smoke: bool = False, max_minutes: float | None = None, init_from: str | None = None,
          **overrides) -> dict:
    """Train (or resume) the embedded model into ``output_dir``; returns the step reached.

    ``init_from``: a directory with phase 1's weights and tokenizer (``save_pretrained`` layout, e.g. the 1,024-token
    kvtiny v1 in ``experiments/kvtiny-v1``); the run skips phase 1 and trains ``long_stages`` from it. A checkpoint
    in ``output_dir`` wins over it, so the same command resumes an interrupted run.
    """
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = TrainConfig(**{**(SMOKE if smoke else {}), **overrides})
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    start_from = None if checkpoint_path.exists() or init_from is None else Path(init_from)
    (out / "train_config.json").write_text(json.dumps(
        {**asdict(config), **({"init_from": str(init_from)} if init_from else {})}, indent=2))
    log = (out / "training_log.jsonl").open("a")
    if start_from is not None:  # phase 1's tokenizer: the weights only make sense with it
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(start_from))
        tokenizer.save_pretrained(str(out))
    elif (out / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out))
    else:
        tokenizer = build_tokenizer(config)
        tokenizer.save_pretrained(str(out))
    model = build_model(config, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=config.weight_decay)
    step, elapsed = 0, 0.0
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
    elif start_from is not None:
        load_weights(model, start_from)
        step = phase_one_steps(config)
    total_steps = phase_one_steps(config) + sum(steps for _, steps in config.long_stages)
    sampler = make_sampler(config, tokenizer, step)
    model.train()
    started, tokens_seen = time.perf_counter() - elapsed, 0
    while step < total_steps:
        if max_minutes is not None and time.perf_counter() - started > 60 * max_minutes:
            break
        if step == phase_one_steps(config):  # same phase-2 start whether phase 1 ran here or came from init_from:
            sampler = make_sampler(config, tokenizer, step)  # same data and fresh optimizer moments
            optimizer = torch.optim.AdamW(model.parameters(), lr=config.long_learning_rate, betas=(0.9, 0.95),
                                          weight_decay=config.weight_decay)
        length = step_length(config, step)
        examples = [encode_example(tokenizer, sampler.sample(length))
                    for _ in range(max(1, config.tokens_per_batch // length))]
        batch = make_batch(examples, tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, total_steps)
        loss, accuracy = batch_loss(model, batch, per_example=config.loss_per_example)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += int(batch["attention_mask"].sum())
        seconds = time.perf_counter() - started
        record = {"step": step, "length": length, "loss": round(loss.item(), 4),

                  "answer_token_accuracy": round(accuracy, 4), "seconds": round(seconds, 1),
                  "tokens_per_second": round(tokens_seen / max(1e-9, seconds - elapsed))}
        if step % config.eval_every == 0 or step == total_steps:
            stage_length = stage_of(config, step - 1)  # the stage's, not a replayed step's length
            record["tasks"] = sampler.active_tasks(stage_length)
            record["eval"] = evaluate(model, tokenizer, ["niah_single_1", "niah_multikey_2", "vt", COPY_TASK],
                                      stage_length, config.eval_samples, seed=10_000 + step)
        log.write(json.dumps(record) + "\n")
        log.flush()
        if step % config.checkpoint_every == 0 or step == total_steps:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "elapsed": seconds}, checkpoint_path.with_suffix(".tmp"))
            checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)  # atomic: an interruption never corrupts it
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    log.close()
    return {"step": step, "total_steps": total_steps}


def train_recipe(recipe: str, output_dir: str, max_minutes: float | None = None) -> dict:
    """Run a recipe's runs in order, each from the previous one's saved weights: one command for a model that took
    several runs to make. Each run trains into ``output_dir/<name>``, so rerunning the command resumes the run it
    stopped in and passes over the finished ones (their checkpoints say they are done).

    A recipe is YAML: ``init_from`` (the first run's starting weights; leave it out to start with phase 1) and
    ``runs``, a list of ``train`` keyword arguments, each with a ``name``. Returns the last run's step counts.
    """
    spec = read_yaml(recipe, option="--recipe")
    if not spec.get("runs"):
        raise ConfigError(f"--recipe {recipe}: not a YAML file with a list of runs: see "
                          "evaluation/embedded/recipes/ for an example")
    init_from, result = spec.get("init_from"), {}
    for run in spec["runs"]:
        settings = dict(run)
        name = settings.pop("name", None)
        if not name:
            raise ConfigError(f"--recipe {recipe}: every run needs a name (its folder under --output_dir)")
        if "init_from" in settings:
            raise ConfigError(f"--recipe {recipe}: run {name} sets init_from; a run starts from the previous run, "
                              "and the first from the recipe's top-level init_from")
        run_dir = str(Path(output_dir) / name)
        result = train(run_dir, max_minutes=max_minutes, init_from=init_from, **settings)
        if result["step"] < result["total_steps"]:  # out of time: the rerun resumes here
            return result
        init_from = run_dir
    return result


def main() -> None:
    try:
        if sys.argv[1:2] == ["recipe"]:
            fire.Fire(train_recipe, command=sys.argv[2:])
        else:
            fire.Fire(train)
    except ConfigError as error:
        sys.exit(f"train: {error}")


if __name__ == "__main__":
    main()
