"""Offline RULER generator: the 13 RULER tasks for any tokenizer and context length, split like ``simonjegou/ruler``.

Semantics follow RULER-old (``hsiehjackson/RULER`` ``e40fae1``, ``scripts/data/synthetic/``: ``niah.py``,
``variable_tracking.py``, ``common_words_extraction.py``, ``freq_words_extraction.py``, ``qa.py``, templates from
``constants.py``), the revision kvpress's Hugging Face copy ``simonjegou/ruler`` was made from: the ``assgined`` typo,
the singular rewrite of NIAH templates, the one-shot VT example with its leading space, no space after ``are:`` in the
CWE example. Sizing uses RULER-new's binary search on the haystack units (``NVIDIA/RULER`` commit ``56ea4ef``), then
the per-sample shrink guard, so every record satisfies::

    len(tokenizer.encode(context + question + answer_prefix, add_special_tokens=False)) + max_new_tokens
        <= max_seq_length

Records use the common sample layout, split with kvpress's regexes
(``evaluation/benchmarks/ruler/create_huggingface_dataset.py``; :func:`split_input`): ``context``, ``question``,
``answer_prefix``, ``answer`` (list of str), ``task``, ``max_new_tokens``, plus ``index`` (sample number within its
task) and ``length`` (RULER's field: prompt tokens + ``max_new_tokens``).

Tasks: niah_single_1 (noise haystack), niah_multikey_2 / niah_multikey_3 (needle haystacks), vt, cwe and fwe need
no data (:data:`OFFLINE_TASKS`); the other five NIAH tasks need an essay text (``essay_path``), qa_1 SQuAD v2.0 dev
(``squad_path``), qa_2 HotpotQA dev distractor (``hotpotqa_path``).

API: :func:`generate_ruler` (several tasks, one seed each, as RULER's ``prepare.py``) and :func:`generate_task` (one
task, one length; pass ``rng=RulerRng.from_seed(s)`` to keep drawing from one stream across calls, e.g. to make
training data). The tokenizer is anything with ``encode(text, add_special_tokens=False)`` (:class:`TokenizerLike`).

Deviations from RULER (documented choices):

1. Essay haystacks are split into sentences by a small deterministic regex (:func:`split_sentences`) instead of
   NLTK's ``sent_tokenize`` (its punkt model is a separate download). Abbreviations such as "Mr. Smith" are split,
   so needles can land a sentence away from where punkt would put them.
2. The essay corpus repeats cyclically when a haystack needs more words than it holds (RULER-new; RULER-old caps
   the haystack at the corpus length). Any long English prose can stand in for Paul Graham's essays.
3. Sizing: RULER-new's binary search, with the upper bound doubled while it still fits (so CWE needs no special
   4096-word probe) and ``max_new_tokens`` reserved for every task (RULER-new; RULER-old's FWE did not reserve it).
   FWE keeps its own linear loop (``freq_words_extraction.py``) on that budget.
4. The per-sample guard shrinks by the estimated surplus of haystack units, at most ``incremental`` (RULER always
   shrinks by ``incremental``), so samples stay close to the target length.
5. VT's one-shot example is sized for ``min(500, max_seq_length // 2)`` tokens (RULER: 500), so short budgets work;
   the whole prompt, example included, is counted (RULER counts the example separately and adds the counts).
6. Randomness: one ``random.Random(seed)`` and one ``numpy.random.RandomState(seed)`` per task (:class:`RulerRng`)
   in place of the global generators, drawn in RULER's order within a sample. The number of sizing probes depends
   on the tokenizer, so byte-identical reproduction of ``simonjegou/ruler`` is out of reach (it would also need
   RULER-old's linear search, the same essay file, wonderwords version and the Llama-3.1 tokenizer).
7. QA: sample ``i`` asks question ``i`` of the file, cycling when ``num_samples`` exceeds the answerable questions;
   RULER's in-place shuffle of its global document list is not reproduced. A VT draw with a repeated variable name
   is de-duplicated (RULER keeps the duplicate); FWE's vocabulary has at least the 4 words its answer needs.

The 6.2 M adjective-noun NIAH keys (``sorted(set(f"{adj}-{noun}"))``) are indexed lazily by
:class:`AdjectiveNounWords` (same order and length; materialising them takes ~10 s).
"""

from __future__ import annotations

import bisect
import difflib
import functools
import importlib.util
import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, overload

import numpy as np
from scipy.special import zeta

# --------------------------------------------------------------------------------------------------------------------
# Templates and constants (RULER ``scripts/data/synthetic/constants.py``, RULER-old, "base" model template)
# --------------------------------------------------------------------------------------------------------------------

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assgined the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. {context}\n"
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    "\n\nThe following are given documents.\n\n{context}\n\n"
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    "\n\nQuestion: {query}"
)
QA_ANSWER_PREFIX = " Answer:"
QA_DOCUMENT = "Document {i}:\n{document}"

TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# niah.py: list(np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int))
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]

# kvpress create_huggingface_dataset.py: context = text before the LAST question match; the answer prefix starts at
# the FIRST answer match after it.
QUESTION_PATTERNS = {
    "niah": re.compile(r"What (?:is|are all) the special magic"),
    "vt": re.compile(r"Question: Find all variables that are assigned the value"),
    "cwe": re.compile(r"Question: What are the 10 most common words in the above list\?"),
    "fwe": re.compile(r"Question: Do not provide any explanation\."),
    "qa": re.compile(r"Answer the question based on the given documents\."),
}
ANSWER_PATTERNS = {
    "niah": re.compile(r"The special magic"),
    "vt": re.compile(r"Answer:"),
    "cwe": re.compile(r"Answer:"),
    "fwe": re.compile(r"Answer:"),
    "qa": re.compile(r"Answer:"),
}

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket), then whitespace, then something
# that starts a sentence. Stand-in for nltk.sent_tokenize (deviation 1).
_SENTENCE_BREAK = re.compile(
    r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|(?<=[.!?][\"')\]])\s+(?=[\"'(\[]?[A-Z0-9])"
)


class TokenizerLike(Protocol):
    """Anything with ``encode(text, add_special_tokens=False)`` (Hugging Face tokenizers have it)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> Sequence[int]: ...


TokenCounter = Callable[[str], int]


def count_tokens(tokenizer: TokenizerLike, text: str) -> int:
    """Tokens of ``text`` without special tokens (RULER ``scripts/data/tokenizer.py`` counts ``tokenize(text)``)."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def split_input(text: str, family: str) -> tuple[str, str, str]:
    """Split a RULER ``input`` into ``(context, question, answer_prefix)`` exactly as kvpress does.

    kvpress ``evaluation/benchmarks/ruler/create_huggingface_dataset.py``: the context ends at the last match of the
    family's question regex, the answer prefix starts at the first match of its answer regex after that.
    """
    start = list(QUESTION_PATTERNS[family].finditer(text))[-1].start()
    rest = text[start:]
    cut = ANSWER_PATTERNS[family].search(rest).start()
    return text[:start], rest[:cut], rest[cut:]


def split_sentences(text: str) -> list[str]:
    """Deterministic regex sentence splitter standing in for ``nltk.sent_tokenize`` (module deviation 1).

    Splits at whitespace after ``.``, ``!`` or ``?`` (optionally closed by a quote or bracket) when the next
    character starts a sentence (capital letter, digit, opening quote or bracket). Joining the result with single
    spaces gives back a whitespace-normalised ``text``.
    """
    text = text.strip()
    return _SENTENCE_BREAK.split(text) if text else []


# --------------------------------------------------------------------------------------------------------------------
# Random streams and word lists
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RulerRng:
    """The random streams of one task: RULER's global ``random`` / ``np.random`` and its fixed-seed shuffles.

    RULER's scripts call ``random.seed(seed)`` and ``np.random.seed(seed)`` and shuffle with a fresh
    ``random.Random(seed)`` (the same permutation for every list of a given length). Pass one instance to several
    :func:`generate_task` calls to keep drawing from the same streams (e.g. for training data).
    """

    seed: int
    py: random.Random
    numpy: np.random.RandomState

    @classmethod
    def from_seed(cls, seed: int) -> RulerRng:
        return cls(seed=seed, py=random.Random(seed), numpy=np.random.RandomState(seed))

    def fixed_shuffle(self, items: list[Any]) -> None:
        """``random.Random(seed).shuffle(items)``, as RULER shuffles needles, word lists and documents."""
        random.Random(self.seed).shuffle(items)


@functools.cache
def wonderwords_list(name: str) -> tuple[str, ...]:
    """A wonderwords word list (``nounlist.txt``, ``adjectivelist.txt``, ``verblist.txt``), read as RULER reads it
    (``wonderwords.random_word._get_words_from_text_file``: lines, right-stripped).

    The file is located without importing wonderwords (its import reads every list with a deprecated API).
    """
    spec = importlib.util.find_spec("wonderwords")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("RULER's word lists come from wonderwords: pip install wonderwords==2.2.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / name
    with path.open("r", encoding="utf-8") as handle:
        return tuple(line.rstrip() for line in handle.readlines())


class AdjectiveNounWords(Sequence[str]):
    """Lazy ``sorted(set(f"{adj}-{noun}" for adj in adjectives for noun in nouns))`` (RULER ``niah.py`` keys).

    Strings of one adjective form a contiguous block ordered like the sorted nouns, except when an adjective
    extends another with a hyphen (``high`` / ``high-pitched``): such a cluster shares the prefix ``root-`` and is
    materialised and sorted on its own. Blocks never interleave otherwise, so they sort by ``root + "-"``.
    """

    def __init__(self, adjectives: Iterable[str], nouns: Iterable[str]) -> None:
        self._nouns = sorted(set(nouns))
        clusters: dict[str, list[str]] = {}
        for adj in sorted(set(adjectives), key=lambda a: (len(a), a)):
            root = next((adj[:i] for i, ch in enumerate(adj) if ch == "-" and adj[:i] in clusters), adj)
            clusters.setdefault(root, []).append(adj)
        self._blocks: list[str | list[str]] = []
        for root in sorted(clusters, key=lambda r: r + "-"):
            members = clusters[root]
            block = root if len(members) == 1 else sorted({f"{a}-{n}" for a in members for n in self._nouns})
            self._blocks.append(block)
        sizes = [len(self._nouns) if isinstance(b, str) else len(b) for b in self._blocks]
        self._offsets = [0, *np.cumsum(sizes).tolist()]

    def __len__(self) -> int:
        return self._offsets[-1]

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        block_id = bisect.bisect_right(self._offsets, index) - 1
        block, offset = self._blocks[block_id], index - self._offsets[block_id]
        return f"{block}-{self._nouns[offset]}" if isinstance(block, str) else block[offset]


@functools.cache
def adjective_noun_words() -> AdjectiveNounWords:
    """RULER's NIAH word keys/values: adjective-noun pairs from wonderwords (6,175,260 with wonderwords 2.2.0)."""
    return AdjectiveNounWords(wonderwords_list("adjectivelist.txt"), wonderwords_list("nounlist.txt"))


@functools.cache
def common_words() -> tuple[str, ...]:
    """CWE vocabulary before its per-seed shuffle: ``sorted(set(nouns + adjs + verbs))`` (8,169 with 2.2.0)."""
    lists = ("nounlist.txt", "adjectivelist.txt", "verblist.txt")
    return tuple(sorted({word for name in lists for word in wonderwords_list(name)}))


def _draw_number(rng: RulerRng) -> str:
    return str(rng.py.randint(10**6, 10**7 - 1))


def _draw_word(rng: RulerRng) -> str:
    return rng.py.choice(adjective_noun_words())


def _draw_uuid(rng: RulerRng) -> str:
    return str(uuid.UUID(int=rng.py.getrandbits(128), version=4))


VALUE_DRAWS: dict[str, Callable[[RulerRng], str]] = {"numbers": _draw_number, "words": _draw_word, "uuids": _draw_uuid}


# --------------------------------------------------------------------------------------------------------------------
# Task builders: build(n_units, rng, index) -> (RULER input, answers); fit(...) -> n_units
# --------------------------------------------------------------------------------------------------------------------


class TaskBuilder:
    """One task's sample maker. Subclasses set the sizing knobs and implement :meth:`build`.

    ``incremental`` is RULER's haystack increment (reference.md §1.4), ``min_units`` the smallest haystack a sample
    can have, ``max_units`` a cap (CWE vocabulary, QA documents) or ``None``.
    """

    incremental: int = 1
    min_units: int = 1
    max_units: int | None = None

    def build(self, n: int, rng: RulerRng, index: int) -> tuple[str, list[str]]:
        raise NotImplementedError

    def fit(self, count: TokenCounter, budget: int, rng: RulerRng) -> int:
        """Largest unit count whose (freshly drawn) probe fits ``budget`` tokens: RULER-new's binary search.

        Upper bound ``max(3 * budget / tokens_per_unit, 2 * incremental)`` from a probe of ``incremental`` units,
        doubled while a probe at it still fits; every probe draws a new sample (module deviation 3).
        """
        cap = self.max_units if self.max_units is not None else math.inf
        step = int(min(self.incremental, cap))

        def fits(n: int) -> bool:
            return count(self.build(n, rng, 0)[0]) <= budget

        per_unit = max(count(self.build(step, rng, 0)[0]) / step, 1e-6)
        lo, best = step, step
        hi = int(min(max(3 * budget / per_unit, 2 * step), cap))
        while hi < cap and fits(hi):
            lo, best, hi = hi + 1, hi, int(min(2 * hi, cap))
        while lo <= hi:
            mid = (lo + hi) // 2
            if fits(mid):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best


@dataclass(frozen=True)
class NiahConfig:
    """RULER ``niah.py`` arguments: haystack ``noise`` (RULER-old ``repeat``), ``essay`` or ``needle``; key and
    value types ``numbers`` / ``words`` / ``uuids``; keys ``k``, values per key ``v``, queried keys ``q``."""

    haystack: str
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1

    def __post_init__(self) -> None:
        if self.haystack not in ("noise", "essay", "needle"):
            raise ValueError(f"unknown NIAH haystack {self.haystack!r}; use 'noise', 'essay' or 'needle'")
        for kind in (self.key_type, self.value_type):
            if kind not in VALUE_DRAWS:
                raise ValueError(f"unknown NIAH value type {kind!r}; use one of {sorted(VALUE_DRAWS)}")


def niah_template(config: NiahConfig) -> tuple[str, str]:
    """Template + answer prefix and the type name, with RULER's singular rewrite when ``q * v == 1`` (``niah.py``)."""
    template, type_name = NIAH_TEMPLATE + NIAH_ANSWER_PREFIX, config.value_type
    if config.num_queries * config.num_values == 1:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(old, new)
        type_name = type_name[:-1]
    return template, type_name


class NiahBuilder(TaskBuilder):
    """RULER ``niah.py`` ``generate_input_output``: needles in a noise, essay or needle haystack."""

    def __init__(self, config: NiahConfig, max_seq_length: int, essay_words: Sequence[str] | None = None) -> None:
        if config.haystack == "essay" and not essay_words:
            raise ValueError("an essay haystack needs a non-empty essay text (essay_path=...)")
        self.config = config
        self.num_keys = max(config.num_keys, config.num_queries)
        essay = config.haystack == "essay"
        self.incremental = 500 if essay else (5 if max_seq_length < 4096 else 25)
        self.min_units = 1 if essay else self.num_keys * config.num_values
        self._essay_words = essay_words
        self._template, self._type_name = niah_template(config)

    def _needle(self, key: str, value: str) -> str:
        return NEEDLE.format(type_needle_v=self.config.value_type, key=key, value=value)

    def build(self, n: int, rng: RulerRng, index: int) -> tuple[str, list[str]]:
        cfg = self.config
        draw_key, draw_value = VALUE_DRAWS[cfg.key_type], VALUE_DRAWS[cfg.value_type]
        keys, values, needles = [], [], []
        for _ in range(self.num_keys):
            keys.append(draw_key(rng))
            values.append([draw_value(rng) for _ in range(cfg.num_values)])
            needles += [self._needle(keys[-1], value) for value in values[-1]]
        rng.fixed_shuffle(needles)
        context = self._essay_context(n, needles, rng) if cfg.haystack == "essay" else self._line_context(
            n, needles, rng)
        queried = rng.py.sample(range(self.num_keys), cfg.num_queries)
        queries = [keys[i] for i in queried]
        answers = [value for i in queried for value in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        return self._template.format(type_needle_v=self._type_name, context=context, query=query), answers

    def _line_context(self, n: int, needles: list[str], rng: RulerRng) -> str:
        """Noise / needle haystack: ``n`` lines, needles inserted at random line indices, joined by newlines."""
        if self.config.haystack == "noise":
            sentences = [NOISE] * n
        else:
            draw_key, draw_value = VALUE_DRAWS[self.config.key_type], VALUE_DRAWS[self.config.value_type]
            sentences = [self._needle(draw_key(rng), draw_value(rng)) for _ in range(n)]
        for position, needle in zip(sorted(rng.py.sample(range(n), len(needles)), reverse=True), needles, strict=True):
            sentences.insert(position, needle)
        return "\n".join(sentences)

    def _essay_context(self, n: int, needles: list[str], rng: RulerRng) -> str:
        """Essay haystack: first ``n`` corpus words, needles between sentences at random ``DEPTHS``."""
        words = self._essay_words
        repeated = list(words) * (n // len(words)) + list(words[: n % len(words)]) if n > len(words) else words[:n]
        sentences = split_sentences(" ".join(repeated))
        depths = sorted(int(len(sentences) * (depth / 100)) for depth in rng.py.sample(DEPTHS, len(needles)))
        positions = [0, *depths, len(sentences)]
        pieces = []
        for i in range(1, len(positions)):
            pieces.append(" ".join(sentences[positions[i - 1] : positions[i]]))
            if i - 1 < len(needles):
                pieces.append(needles[i - 1])
        return " ".join(pieces)


def vt_template(is_icl: bool) -> str:
    """VT template + answer prefix; the one-shot example's version is whitespace-collapsed with its last word before
    the answer prefix (``above.``) dropped (RULER-old ``variable_tracking.py``)."""
    template = VT_TEMPLATE + VT_ANSWER_PREFIX
    if not is_icl:
        return template
    cut = template.index(VT_ANSWER_PREFIX[:10])
    return " ".join(template[:cut].split()[:-1]) + template[cut:]


class VariableTrackingBuilder(TaskBuilder):
    """RULER ``variable_tracking.py``: one chain of 4 hops hidden among noise lines, after the one-shot example."""

    def __init__(self, example: str = "", is_icl: bool = False, num_chains: int = 1, num_hops: int = 4) -> None:
        self.incremental = 5 if is_icl else 10
        self.num_chains, self.num_hops = num_chains, num_hops
        self._chain_hops = min(10, num_hops) if is_icl else num_hops
        self._name_length = 3 if is_icl else 5
        self._template = vt_template(is_icl)
        self._prefix = f" {example}\n\n" if example else ""

    def _name(self, rng: RulerRng) -> str:
        return "".join(rng.py.choices(string.ascii_uppercase, k=self._name_length))

    def _chains(self, rng: RulerRng) -> tuple[list[list[str]], list[list[str]]]:
        size, width = (self._chain_hops + 1) * self.num_chains, self._chain_hops + 1
        names = [self._name(rng) for _ in range(size)]
        while len(set(names)) < size:
            names.append(self._name(rng))
        names = list(dict.fromkeys(names))
        groups, chains = [], []
        for start in range(0, size, width):
            group = names[start : start + width]
            chain = [f"VAR {group[0]} = {rng.numpy.randint(10000, 99999)}"]
            chain += [f"VAR {group[j + 1]} = VAR {group[j]} " for j in range(self._chain_hops)]
            groups.append(group)
            chains.append(chain)
        return groups, chains

    def build(self, n: int, rng: RulerRng, index: int) -> tuple[str, list[str]]:
        groups, chains = self._chains(rng)
        sentences = [NOISE + "\n"] * n
        if len(sentences) <= len(chains[0]):
            pieces = [piece for line in sentences for piece in line.split(".")]
            sentences = [piece + "." if piece.strip() else piece for piece in pieces]
        for chain in chains:
            positions = sorted(rng.py.sample(range(len(sentences)), len(chain)))
            for j, position in enumerate(positions):
                sentences.insert(position + j, chain[j])
        context = " ".join(sentences).replace(". \n", ".\n")
        value = chains[0][0].split("=")[-1].strip()
        text = self._template.format(context=context, query=value, num_v=self.num_hops + 1)
        return self._prefix + text, groups[0]


def numbered(words: Sequence[str]) -> str:
    """``"1. w1 2. w2 ..."`` (RULER ``common_words_extraction.py``)."""
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


class CommonWordsBuilder(TaskBuilder):
    """RULER ``common_words_extraction.py``: an example list with its answer, then the numbered list to analyse."""

    num_common = 10

    def __init__(self, seed: int, max_seq_length: int) -> None:
        words = list(common_words())
        random.Random(seed).shuffle(words)
        self._words = words
        self.incremental, self.min_units, self.max_units = 10, self.num_common, len(words)
        small = max_seq_length < 4096
        self._example_args = (20, 3, 1) if small else (40, 10, 3)
        self._repeats = (6, 1) if small else (30, 3)
        self._template = CWE_TEMPLATE + CWE_ANSWER_PREFIX

    def _word_list(self, num_words: int, common: int, uncommon: int, rng: RulerRng) -> tuple[str, list[str]]:
        chosen = rng.py.sample(self._words, num_words)
        frequent, rare = chosen[: self.num_common], chosen[self.num_common :]
        listed = frequent * common + rare * uncommon
        rng.fixed_shuffle(listed)
        return numbered(listed), frequent

    def build(self, n: int, rng: RulerRng, index: int) -> tuple[str, list[str]]:
        example_context, example_answer = self._word_list(*self._example_args, rng)
        context, answer = self._word_list(n, *self._repeats, rng)
        example = self._template.format(context=example_context, query="") + numbered(example_answer)
        return example + "\n" + self._template.format(context=context, query=""), answer


class FreqWordsBuilder(TaskBuilder):
    """RULER ``freq_words_extraction.py``: Zipf(alpha) counts over random 6-letter coded words; rank 1 is ``...``."""

    def __init__(self, seed: int, max_seq_length: int, alpha: float = 2.0, word_length: int = 6) -> None:
        self.seed, self.alpha, self.word_length = seed, alpha, word_length
        self.vocab_size = max(4, max_seq_length // 50)
        budget = max_seq_length - TOKENS_TO_GENERATE["fwe"]
        self.incremental = max(1, budget // 32)
        self._template = FWE_TEMPLATE + FWE_ANSWER_PREFIX
        ranks = np.arange(1, self.vocab_size + 1)
        self._shares = ranks**-alpha / zeta(alpha)

    def _word(self, rng: RulerRng) -> str:
        return "".join(rng.py.choices(string.ascii_lowercase, k=self.word_length))

    def _vocab(self, rng: RulerRng) -> list[str]:
        vocab = [self._word(rng) for _ in range(self.vocab_size)]
        while len(set(vocab)) < self.vocab_size:
            vocab.append(self._word(rng))
        vocab = sorted(set(vocab))
        rng.fixed_shuffle(vocab)
        vocab[0] = "..."
        return vocab

    def _text(self, vocab: list[str], n: int) -> str:
        counts = (n * self._shares).astype(int)
        words = [word for word, count in zip(vocab, counts, strict=True) for _ in range(count)]
        random.Random(self.seed).shuffle(words)
        return self._template.format(context=" ".join(words), query="")

    def build(self, n: int, rng: RulerRng, index: int) -> tuple[str, list[str]]:
        vocab = self._vocab(rng)
        return self._text(vocab, n), vocab[1:4]

    def fit(self, count: TokenCounter, budget: int, rng: RulerRng) -> int:
        """RULER's own loop: start at ``budget // 6`` words, grow by ``budget // 32`` until the count reaches the
        budget, then step back once."""
        vocab, n = self._vocab(rng), max(1, budget // self.word_length)
        while count(self._text(vocab, n)) < budget:
            n += self.incremental
        return max(self.min_units, n - self.incremental)


@dataclass(frozen=True)
class QaItem:
    """One answerable question: gold document ids, same-article document ids (SQuAD) and answers."""

    query: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]
    more: tuple[int, ...] = ()


@dataclass(frozen=True)
class QaCorpus:
    """RULER ``qa.py`` data: sorted unique documents and the questions in file order."""

    items: tuple[QaItem, ...]
    documents: tuple[str, ...]


class QaBuilder(TaskBuilder):
    """RULER ``qa.py``: the gold documents, then same-article and random distractors, shuffled with the seed."""

    def __init__(self, corpus: QaCorpus) -> None:
        if not corpus.items:
            raise ValueError("the QA file has no answerable question")
        self.corpus = corpus
        self.incremental, self.min_units, self.max_units = 10, 1, len(corpus.documents)

    def _doc_ids(self, item: QaItem, n: int, rng: RulerRng) -> list[int]:
        gold, more = list(item.gold), list(item.more)
        if n - len(gold) > len(more):
            excluded = set(gold) | set(more)
            others = [i for i in range(len(self.corpus.documents)) if i not in excluded]
            return gold + more + rng.py.sample(others, max(0, n - len(gold) - len(more)))
        return gold + rng.py.sample(more, max(0, n - len(gold)))

    def build(self, n: int, rng: RulerRng, index: int) -> tuple[str, list[str]]:
        item = self.corpus.items[index % len(self.corpus.items)]
        documents = self.corpus.documents
        selected = [documents[i] for i in self._doc_ids(item, n, rng)] if n < len(documents) else list(documents)
        rng.fixed_shuffle(selected)
        context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(selected))
        return (QA_TEMPLATE + QA_ANSWER_PREFIX).format(context=context, query=item.query), list(item.answers)


# --------------------------------------------------------------------------------------------------------------------
# External data (file paths are explicit inputs; loaders cached per file version)
# --------------------------------------------------------------------------------------------------------------------


def _file_key(path: str | Path) -> tuple[str, int, int]:
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_mtime_ns, stat.st_size


def load_essay_words(path: str | Path) -> tuple[str, ...]:
    """Essay corpus as RULER splits it: ``re.sub(r"\\s+", " ", text).split(" ")``.

    Accepts RULER's ``PaulGrahamEssays.json`` (``{"text": ...}``) or any plain text file (deviation 2).
    """
    return _load_essay_words(_file_key(path))


@functools.lru_cache(maxsize=4)
def _load_essay_words(key: tuple[str, int, int]) -> tuple[str, ...]:
    text = Path(key[0]).read_text(encoding="utf-8")
    if key[0].endswith(".json"):
        text = json.loads(text)["text"]
    return tuple(re.sub(r"\s+", " ", text).split(" "))


def load_squad(path: str | Path) -> QaCorpus:
    """SQuAD v2.0 dev (``dev-v2.0.json``) as RULER ``qa.py`` ``read_squad`` reads it."""
    return _load_squad(_file_key(path))


@functools.lru_cache(maxsize=2)
def _load_squad(key: tuple[str, int, int]) -> QaCorpus:
    data = json.loads(Path(key[0]).read_text(encoding="utf-8"))["data"]
    documents = sorted({p["context"] for article in data for p in article["paragraphs"]})
    doc_id = {doc: i for i, doc in enumerate(documents)}
    items = []
    for article in data:
        article_docs = [doc_id[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            gold = doc_id[paragraph["context"]]
            more = tuple(i for i in article_docs if i != gold)
            items += [
                QaItem(qa["question"], tuple(a["text"] for a in qa["answers"]), (gold,), more)
                for qa in paragraph["qas"]
                if not qa.get("is_impossible", False)
            ]
    return QaCorpus(tuple(items), tuple(documents))


def load_hotpotqa(path: str | Path) -> QaCorpus:
    """HotpotQA dev distractor (``hotpot_dev_distractor_v1.json``) as RULER ``qa.py`` ``read_hotpotqa`` reads it."""
    return _load_hotpotqa(_file_key(path))


@functools.lru_cache(maxsize=2)
def _load_hotpotqa(key: tuple[str, int, int]) -> QaCorpus:
    data = json.loads(Path(key[0]).read_text(encoding="utf-8"))

    def as_doc(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    documents = sorted({as_doc(t, s) for item in data for t, s in item["context"]})
    doc_id = {doc: i for i, doc in enumerate(documents)}
    items = tuple(
        QaItem(item["question"], (item["answer"],), tuple(doc_id[as_doc(t, s)] for t, s in item["context"]))
        for item in data
    )
    return QaCorpus(items, tuple(documents))


@dataclass(frozen=True)
class RulerSources:
    """Paths of the external data: an essay text, SQuAD v2.0 dev and HotpotQA dev distractor (all optional)."""

    essay_path: str | Path | None = None
    squad_path: str | Path | None = None
    hotpotqa_path: str | Path | None = None

    def path_for(self, task: RulerTask) -> Path:
        """The file ``task`` needs; a one-line ``ValueError`` naming the argument when it was not given."""
        path = getattr(self, task.source)
        if path is None:
            raise ValueError(f"RULER task {task.name!r} needs {SOURCE_HELP[task.source]}: pass {task.source}=<path>")
        if not Path(path).expanduser().is_file():
            raise ValueError(f"RULER task {task.name!r}: {task.source}={str(path)!r} is not a file")
        return Path(path)


SOURCE_HELP = {
    "essay_path": "an essay haystack text (RULER's PaulGrahamEssays.json {\"text\": ...} or any long English .txt)",
    "squad_path": "the SQuAD v2.0 dev file (dev-v2.0.json from rajpurkar.github.io/SQuAD-explorer)",
    "hotpotqa_path": "the HotpotQA dev distractor file (hotpot_dev_distractor_v1.json from hotpotqa.github.io)",
}


# --------------------------------------------------------------------------------------------------------------------
# Task registry (single source of truth for the 13 names)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RulerTask:
    """A RULER task: its name, prompt family (``niah``/``vt``/``cwe``/``fwe``/``qa``), the source argument it needs
    (``None`` when fully synthetic) and, for NIAH, its ``niah.py`` arguments (from RULER ``synthetic.yaml``)."""

    name: str
    family: str
    source: str | None = None
    niah: NiahConfig | None = None

    @property
    def max_new_tokens(self) -> int:
        return TOKENS_TO_GENERATE[self.family]


def _niah(name: str, haystack: str, key: str = "words", value: str = "numbers", k: int = 1, v: int = 1,
          q: int = 1) -> RulerTask:
    source = "essay_path" if haystack == "essay" else None
    return RulerTask(name, "niah", source, NiahConfig(haystack, key, value, k, v, q))


TASKS: dict[str, RulerTask] = {
    task.name: task
    for task in (
        _niah("niah_single_1", "noise"),
        _niah("niah_single_2", "essay"),
        _niah("niah_single_3", "essay", value="uuids"),
        _niah("niah_multikey_1", "essay", k=4),
        _niah("niah_multikey_2", "needle"),
        _niah("niah_multikey_3", "needle", key="uuids", value="uuids"),
        _niah("niah_multivalue", "essay", v=4),
        _niah("niah_multiquery", "essay", q=4),
        RulerTask("vt", "vt"),
        RulerTask("cwe", "cwe"),
        RulerTask("fwe", "fwe"),
        RulerTask("qa_1", "qa", "squad_path"),
        RulerTask("qa_2", "qa", "hotpotqa_path"),
    )
}
ALL_TASKS: tuple[str, ...] = tuple(TASKS)
OFFLINE_TASKS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if task.source is None)


def get_task(name: str) -> RulerTask:
    """The registered task; an unknown name raises ``ValueError`` with a close match and the valid names."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(str(name), ALL_TASKS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown RULER task {name!r}.{hint} Valid tasks: {', '.join(ALL_TASKS)}")


def resolve_tasks(tasks: Iterable[str] | None, sources: RulerSources) -> list[str]:
    """Validate the task list (names and files) before generating anything.

    ``None`` means every task the given inputs allow: the offline tasks, the essay tasks when ``essay_path`` is set,
    qa_1 / qa_2 when their files are set.
    """
    if tasks is None:
        return [name for name, task in TASKS.items() if task.source is None or getattr(sources, task.source)]
    if isinstance(tasks, str):
        tasks = [tasks]
    names = list(dict.fromkeys(tasks))
    for name in names:
        task = get_task(name)
        if task.source is not None:
            sources.path_for(task)
    return names


@dataclass(frozen=True)
class _BuildContext:
    max_seq_length: int
    rng: RulerRng
    sources: RulerSources
    count: TokenCounter


def _make_niah(task: RulerTask, ctx: _BuildContext) -> TaskBuilder:
    essay = load_essay_words(ctx.sources.path_for(task)) if task.source else None
    return NiahBuilder(task.niah, ctx.max_seq_length, essay)


def _make_vt(task: RulerTask, ctx: _BuildContext) -> TaskBuilder:
    """Draw the one-shot example first (RULER order), sized for ``min(500, max_seq_length // 2)`` tokens."""
    example_builder = VariableTrackingBuilder(is_icl=True)
    budget = min(500, ctx.max_seq_length // 2) - task.max_new_tokens
    n = example_builder.fit(ctx.count, budget, ctx.rng)
    text, answers, _ = _fitted_sample(example_builder, ctx.count, budget, n, ctx.rng, 0, "vt (one-shot example)")
    return VariableTrackingBuilder(example=f"{text} {' '.join(answers)}\n\n")


def _make_qa(task: RulerTask, ctx: _BuildContext) -> TaskBuilder:
    loader = load_squad if task.source == "squad_path" else load_hotpotqa
    return QaBuilder(loader(ctx.sources.path_for(task)))


_FACTORIES: dict[str, Callable[[RulerTask, _BuildContext], TaskBuilder]] = {
    "niah": _make_niah,
    "vt": _make_vt,
    "cwe": lambda task, ctx: CommonWordsBuilder(ctx.rng.seed, ctx.max_seq_length),
    "fwe": lambda task, ctx: FreqWordsBuilder(ctx.rng.seed, ctx.max_seq_length),
    "qa": _make_qa,
}


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------


def _fitted_sample(builder: TaskBuilder, count: TokenCounter, budget: int, n: int, rng: RulerRng, index: int,
                   name: str) -> tuple[str, list[str], int]:
    """Per-sample guard: redraw with fewer units until the prompt fits ``budget`` (module deviation 4)."""
    while True:
        text, answers = builder.build(n, rng, index)
        tokens = count(text)
        if tokens <= budget:
            return text, answers, tokens
        if n <= builder.min_units:
            raise ValueError(f"RULER task {name!r}: the smallest prompt ({n} haystack units) has {tokens} tokens, "
                             f"over the budget of {budget}; use a larger max_seq_length")
        surplus = math.ceil((tokens - budget) * n / tokens)
        n = max(builder.min_units, n - min(builder.incremental, max(1, surplus)))


def generate_task(task: str, tokenizer: TokenizerLike, max_seq_length: int, num_samples: int = 500, seed: int = 42,
                  *, rng: RulerRng | None = None, essay_path: str | Path | None = None,
                  squad_path: str | Path | None = None, hotpotqa_path: str | Path | None = None) -> list[dict]:
    """``num_samples`` records of one RULER task sized for ``max_seq_length`` (prompt + ``max_new_tokens``).

    ``rng`` (default ``RulerRng.from_seed(seed)``) lets a caller continue one random stream across calls.
    """
    spec = get_task(task)
    sources = RulerSources(essay_path, squad_path, hotpotqa_path)
    if spec.source is not None:
        sources.path_for(spec)
    if max_seq_length <= spec.max_new_tokens:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for a prompt ({spec.max_new_tokens} "
                         f"tokens are reserved for the answer of {task!r})")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    rng = rng if rng is not None else RulerRng.from_seed(seed)
    count: TokenCounter = functools.partial(count_tokens, tokenizer)
    builder = _FACTORIES[spec.family](spec, _BuildContext(max_seq_length, rng, sources, count))
    budget = max_seq_length - spec.max_new_tokens
    n = builder.fit(count, budget, rng)
    records = []
    for index in range(num_samples):
        text, answers, tokens = _fitted_sample(builder, count, budget, n, rng, index, task)
        context, question, answer_prefix = split_input(text, spec.family)
        records.append({
            "context": context,
            "question": question,
            "answer_prefix": answer_prefix,
            "answer": list(answers),
            "task": task,
            "max_new_tokens": spec.max_new_tokens,
            "index": index,
            "length": tokens + spec.max_new_tokens,
        })
    return records


def generate_ruler(tokenizer: TokenizerLike, max_seq_length: int, tasks: Sequence[str] | None = None,
                   num_samples: int = 500, seed: int = 42, essay_path: str | Path | None = None,
                   squad_path: str | Path | None = None, hotpotqa_path: str | Path | None = None) -> list[dict]:
    """RULER records for ``tasks`` (default: every task the given files allow), each task seeded with ``seed``.

    RULER's ``prepare.py`` runs every task with the same seed (42); so does this function. All task names and files
    are checked before anything is generated.
    """
    sources = RulerSources(essay_path, squad_path, hotpotqa_path)
    return [
        record
        for name in resolve_tasks(tasks, sources)
        for record in generate_task(name, tokenizer, max_seq_length, num_samples, seed, essay_path=essay_path,
                                    squad_path=squad_path, hotpotqa_path=hotpotqa_path)
    ]
