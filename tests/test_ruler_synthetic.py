"""The offline RULER generator: record layout, answers, length fitting, determinism and external-data tasks."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from evaluation.datasets import ruler_synthetic as rs
from evaluation.datasets.ruler_synthetic import (
    ALL_TASKS,
    OFFLINE_TASKS,
    AdjectiveNounWords,
    generate_ruler,
    generate_task,
    split_input,
    split_sentences,
)

MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")


def family(task: str) -> str:
    return task.split("_")[0]


def prose(num_sentences: int, seed: int) -> str:
    """Deterministic English-like sentences (with ?, ! and paragraph breaks) built from the wonderwords lists."""
    rng, words = random.Random(seed), rs.common_words()
    sentences = []
    for i in range(num_sentences):
        end = "?" if i % 7 == 3 else "!" if i % 11 == 5 else "."
        sentences.append(f"The {rng.choice(words)} {rng.choice(words)} was {rng.choice(words)} near "
                         f"{rng.choice(words)}{end}" + ("\n\n" if i % 10 == 9 else ""))
    return " ".join(sentences)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained in memory on the generator's own vocabulary: no download."""
    rng, words = random.Random(0), rs.common_words()
    texts = [rs.NOISE, rs.NIAH_TEMPLATE, rs.VT_TEMPLATE, rs.VT_ANSWER_PREFIX, rs.CWE_TEMPLATE, rs.FWE_TEMPLATE,
             rs.QA_TEMPLATE, prose(50, 1)]
    texts += [" ".join(rng.sample(words, 20)) + f" {rng.randint(0, 10**7)}" for _ in range(600)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="module")
def offline_records(tokenizer) -> dict[str, list[dict]]:
    records = generate_ruler(tokenizer, 1024, num_samples=4)
    return {task: [r for r in records if r["task"] == task] for task in OFFLINE_TASKS}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    """A short essay (so the haystack repeats), and SQuAD v2.0 / HotpotQA dev files in their real layouts."""
    folder = tmp_path_factory.mktemp("ruler_data")
    essay = folder / "essay.txt"
    essay.write_text(prose(50, 0), encoding="utf-8")
    essay_json = folder / "PaulGrahamEssays.json"
    essay_json.write_text(json.dumps({"text": prose(50, 0)}), encoding="utf-8")

    def squad_qa(question: str, answers: list[str], qid: str, impossible: bool) -> dict:
        return {"question": question, "id": qid, "is_impossible": impossible,
                "answers": [{"text": a, "answer_start": 0} for a in answers]}

    squad = {"version": "v2.0", "data": [
        {"title": f"Article{a}", "paragraphs": [
            {"context": f"Paragraph {a}-{p}: the capital of land {a}{p} is city{a}{p}. " + prose(5, 10 * a + p),
             "qas": [squad_qa(f"What is the capital of land {a}{p}?", [f"city{a}{p}", f"City{a}{p}"], f"{a}{p}q",
                              False),
                     squad_qa(f"What is the moon of land {a}{p}?", [], f"{a}{p}i", True)]}
            for p in range(4)]}
        for a in range(6)]}
    hotpot = [
        {"_id": str(i), "question": f"Which fact is number {i}?", "answer": f"answer{i}3", "type": "bridge",
         "level": "easy", "supporting_facts": [[f"Title {i}-3", 1]],
         "context": [[f"Title {i}-{j}", [f"Sentence {i}-{j} one. ", f"Fact {i}-{j} is answer{i}{j}."]]
                     for j in range(10)]}
        for i in range(8)]
    (folder / "dev-v2.0.json").write_text(json.dumps(squad), encoding="utf-8")
    (folder / "hotpot_dev_distractor_v1.json").write_text(json.dumps(hotpot), encoding="utf-8")
    return {"essay_path": str(essay), "essay_json": str(essay_json), "squad_path": str(folder / "dev-v2.0.json"),
            "hotpotqa_path": str(folder / "hotpot_dev_distractor_v1.json")}


def prompt_tokens(tokenizer, record: dict) -> int:
    text = record["context"] + record["question"] + record["answer_prefix"]
    return len(tokenizer.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------------------------------------------------------------
# Registry and errors
# ---------------------------------------------------------------------------------------------------------------------


def test_task_lists():
    assert len(ALL_TASKS) == 13 and len(set(ALL_TASKS)) == 13
    assert set(OFFLINE_TASKS) == {"niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe"}


def test_unknown_task_suggests_a_close_match(tokenizer):
    with pytest.raises(ValueError, match="Did you mean 'niah_single_1'") as error:
        generate_ruler(tokenizer, 1024, tasks=["niah_singel_1"], num_samples=1)
    assert "qa_2" in str(error.value)


@pytest.mark.parametrize(("task", "argument"), [("niah_single_2", "essay_path"), ("niah_multiquery", "essay_path"),
                                                ("qa_1", "squad_path"), ("qa_2", "hotpotqa_path")])
def test_missing_file_is_a_one_line_error(tokenizer, task, argument):
    with pytest.raises(ValueError) as error:
        generate_ruler(tokenizer, 1024, tasks=["niah_single_1", task], num_samples=1)
    message = str(error.value)
    assert "\n" not in message and f"{argument}=" in message and task in message


def test_missing_file_path_is_reported(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        generate_task("niah_single_2", tokenizer, 1024, 1, essay_path=tmp_path / "nope.txt")


def test_too_short_a_budget_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="max_seq_length"):
        generate_task("niah_single_1", tokenizer, 100, 1)
    with pytest.raises(ValueError, match="larger max_seq_length"):
        generate_task("cwe", tokenizer, 200, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Offline tasks: layout, answers and length
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", OFFLINE_TASKS)
def test_record_layout_and_length(tokenizer, offline_records, task):
    records = offline_records[task]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    for record in records:
        assert {"context", "question", "answer_prefix", "answer", "task", "max_new_tokens"} <= set(record)
        assert record["task"] == task and record["max_new_tokens"] == MAX_NEW_TOKENS[family(task)]
        assert isinstance(record["answer"], list) and record["answer"] and all(
            isinstance(a, str) for a in record["answer"])
        tokens = prompt_tokens(tokenizer, record)
        assert record["length"] == tokens + record["max_new_tokens"] <= 1024


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_2", "niah_multikey_3"])
@pytest.mark.parametrize("max_seq_length", [1024, 3000])
def test_noise_and_needle_haystacks_fill_the_budget(tokenizer, task, max_seq_length):
    for record in generate_task(task, tokenizer, max_seq_length, 5, seed=3):
        assert 0.85 * max_seq_length <= prompt_tokens(tokenizer, record) + record["max_new_tokens"] <= max_seq_length


def test_niah_single_1_strings(offline_records):
    for record in offline_records["niah_single_1"]:
        (key,) = re.findall(r"for (\S+) mentioned", record["question"])
        (value,) = record["answer"]
        assert record["question"] == f"What is the special magic number for {key} mentioned in the provided text? "
        assert record["answer_prefix"] == f"The special magic number for {key} mentioned in the provided text is"
        assert record["context"].startswith(
            "A special magic number is hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the number afterwards.\nThe grass is green.")
        assert record["context"].endswith("\n")
        assert f"One of the special magic numbers for {key} is: {value}." in record["context"].split("\n")
        assert re.fullmatch(r"\d{7}", value) and re.fullmatch(r"[a-z' -]+-[A-Za-z' ñ-]+", key)
        assert record["context"].count(rs.NOISE) > 20


@pytest.mark.parametrize("task", ["niah_multikey_2", "niah_multikey_3"])
def test_needle_haystacks(offline_records, task):
    uuid4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    value_pattern = r"\d{7}" if task == "niah_multikey_2" else uuid4
    type_name = "number" if task == "niah_multikey_2" else "uuid"
    for record in offline_records[task]:
        (key,) = re.findall(r"for (\S+) mentioned", record["question"])
        lines = record["context"].split("\n")[1:-1]
        assert len(lines) > 5 and all(line.startswith(f"One of the special magic {type_name}s for ") for line in lines)
        assert f"One of the special magic {type_name}s for {key} is: {record['answer'][0]}." in lines
        assert re.fullmatch(value_pattern, record["answer"][0])
        assert record["question"].startswith(f"What is the special magic {type_name} for {key} ")


def test_vt_chain(offline_records):
    for record in offline_records["vt"]:
        (value,) = re.findall(r"the value (\d{5}) in the text above\. $", record["question"])
        assert record["question"] == (
            f"Question: Find all variables that are assigned the value {value} in the text above. ")
        assert record["answer_prefix"] == (
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"5 variables are assgined the value {value}, they are: ")
        main = record["context"].split("\n\n\n\n")[-1]
        assert main.startswith(
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
        names = record["answer"]
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        assert f"VAR {names[0]} = {value}" in main
        for previous, current in zip(names, names[1:], strict=False):
            assert f"VAR {current} = VAR {previous} " in main
        # The one-shot example comes first, with its answer (3-letter names), as in RULER-old.
        assert record["context"].startswith(" Memorize and track the chain(s) of variable assignment hidden in the "
                                            "following text. VAR ")
        assert re.search(r"they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}\n\n\n\n", record["context"])


def test_cwe_answers_are_the_ten_most_common(offline_records):
    for record in offline_records["cwe"]:
        assert record["question"] == "Question: What are the 10 most common words in the above list? "
        assert record["answer_prefix"] == "Answer: The top 10 words that appear most often in the list are:"
        main = record["context"].split("Memorize the ones that appear most often.\n")[-1]
        counts = Counter(re.findall(r"\d+\. (\S+(?: \S+)*?)(?= \d+\. |\n$)", main))
        assert {word: counts[word] for word in record["answer"]} == {word: 6 for word in record["answer"]}
        assert len(record["answer"]) == 10 and set(counts.values()) == {6, 1}
        assert "in the list are:1. " in record["context"]  # RULER-old: no space before the example's answer


def test_cwe_long_context_repeats(tokenizer):
    (record,) = generate_task("cwe", tokenizer, 4096, 1)
    main = record["context"].split("Memorize the ones that appear most often.\n")[-1]
    counts = Counter(re.findall(r"\d+\. (\S+(?: \S+)*?)(?= \d+\. |\n$)", main))
    assert {counts[word] for word in record["answer"]} == {30} and set(counts.values()) == {30, 3}
    assert 0.85 * 4096 <= record["length"] <= 4096


def test_fwe_answers_are_ranks_two_to_four(offline_records):
    for record in offline_records["fwe"]:
        assert record["question"] == ("Question: Do not provide any explanation. Please ignore the dots '....'. "
                                      "What are the three most frequently appeared words in the above coded text? ")
        assert record["answer_prefix"] == ("Answer: According to the coded text above, the three most frequently "
                                           "appeared words are:")
        coded = record["context"].split("Find the three most frequently appeared coded words. ")[1].rstrip("\n")
        ranking = [word for word, _ in Counter(coded.split(" ")).most_common()]
        assert ranking[0] == "..." and ranking[1:4] == record["answer"]
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in record["answer"])


# ---------------------------------------------------------------------------------------------------------------------
# Determinism, tokenizer duck typing and random streams
# ---------------------------------------------------------------------------------------------------------------------


def test_same_seed_same_records_different_seed_different(tokenizer, offline_records):
    again = generate_ruler(tokenizer, 1024, num_samples=4)
    assert again == [record for task in OFFLINE_TASKS for record in offline_records[task]]
    other = generate_ruler(tokenizer, 1024, num_samples=4, seed=7)
    for task in OFFLINE_TASKS:
        assert [r for r in other if r["task"] == task] != offline_records[task]


def test_any_encode_method_works_and_a_shared_rng_continues():
    class Whitespace:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [0] * len(text.split())

    rng = rs.RulerRng.from_seed(5)
    first = generate_task("niah_single_1", Whitespace(), 600, 2, rng=rng)
    second = generate_task("niah_single_1", Whitespace(), 600, 2, rng=rng)
    assert first[0]["answer"] != second[0]["answer"]
    assert all(len((r["context"] + r["question"] + r["answer_prefix"]).split()) + 128 <= 600 for r in first + second)


# ---------------------------------------------------------------------------------------------------------------------
# Essay and QA tasks
# ---------------------------------------------------------------------------------------------------------------------


def test_essay_tasks(tokenizer, data_files):
    records = generate_ruler(tokenizer, 1024, tasks=list(ESSAY_TASKS), num_samples=2,
                             essay_path=data_files["essay_path"])
    by_task = {task: [r for r in records if r["task"] == task] for task in ESSAY_TASKS}
    for task, group in by_task.items():
        assert len(group) == 2, task
        for record in group:
            assert prompt_tokens(tokenizer, record) + 128 <= 1024
            assert "The grass is green" not in record["context"] and " was " in record["context"]
            for value in record["answer"]:
                assert re.search(rf"One of the special magic (numbers|uuids) for \S+ is: {value}\.", record["context"])
    assert len(by_task["niah_multivalue"][0]["answer"]) == 4 and len(by_task["niah_multiquery"][0]["answer"]) == 4
    assert re.fullmatch(r"[0-9a-f-]{36}", by_task["niah_single_3"][0]["answer"][0])
    assert by_task["niah_multikey_1"][0]["context"].count("One of the special magic numbers for ") == 4
    first_sentence = prose(50, 0).split(".")[0]
    assert by_task["niah_single_2"][0]["context"].count(first_sentence) >= 2  # a short essay repeats cyclically
    multiquery = by_task["niah_multiquery"][0]
    assert re.fullmatch(r"What are all the special magic numbers for \S+, \S+, \S+, and \S+ mentioned in the "
                        r"provided text\? ", multiquery["question"])
    assert multiquery["answer_prefix"].endswith("mentioned in the provided text are")
    assert multiquery["context"].startswith("Some special magic numbers are hidden within the following text.")


def test_essay_json_layout_is_accepted(tokenizer, data_files):
    from_text = generate_task("niah_single_2", tokenizer, 1024, 1, essay_path=data_files["essay_path"])
    from_json = generate_task("niah_single_2", tokenizer, 1024, 1, essay_path=data_files["essay_json"])
    assert from_json == from_text


def test_default_task_list_follows_the_given_files(tokenizer, data_files):
    records = generate_ruler(tokenizer, 1024, num_samples=1, **data_files_without_json(data_files))
    assert [r["task"] for r in records] == list(ALL_TASKS)


def data_files_without_json(files: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in files.items() if k != "essay_json"}


def test_qa_tasks(tokenizer, data_files):
    squad = generate_task("qa_1", tokenizer, 1024, 8, squad_path=data_files["squad_path"])
    hotpot = generate_task("qa_2", tokenizer, 1024, 9, hotpotqa_path=data_files["hotpotqa_path"])
    instruction = ("Answer the question based on the given documents. Only give me the answer and do not output any "
                   "other words.")
    for record in squad + hotpot:
        assert record["max_new_tokens"] == 32 and record["answer_prefix"] == "Answer:"
        assert record["context"].startswith(f"{instruction}\n\nThe following are given documents.\n\nDocument 1:\n")
        assert record["context"].endswith("\n\n")
        assert prompt_tokens(tokenizer, record) + 32 <= 1024
    (land,) = re.findall(r"land (\d\d)\? $", squad[5]["question"])
    assert squad[5]["question"] == f"{instruction}\n\nQuestion: What is the capital of land {land}? "
    assert squad[5]["answer"] == [f"city{land}", f"City{land}"]  # all gold answers; impossible questions skipped
    assert f"the capital of land {land} is city{land}." in squad[5]["context"]
    assert hotpot[2]["answer"] == ["answer23"] and "Fact 2-3 is answer23." in hotpot[2]["context"]
    assert hotpot[8]["answer"] == ["answer03"]  # cycles through the file's questions
    assert all(f"Title 2-{j}\nSentence 2-{j} one. Fact 2-{j}" in hotpot[2]["context"] for j in range(10))


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def test_split_input_matches_the_kvpress_examples():
    text = rs.niah_template(rs.NiahConfig("noise"))[0].format(type_needle_v="number", context="HAY", query="k-v")
    assert split_input(text, "niah") == (
        "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you about "
        "the number afterwards.\nHAY\n",
        "What is the special magic number for k-v mentioned in the provided text? ",
        "The special magic number for k-v mentioned in the provided text is",
    )
    fwe = (rs.FWE_TEMPLATE + rs.FWE_ANSWER_PREFIX).format(context="a b", query="")
    assert split_input(fwe, "fwe")[0] == ("Read the following coded text and track the frequency of each coded word. "
                                          "Find the three most frequently appeared coded words. a b\n")


def test_adjective_noun_words_equal_the_materialised_list():
    adjectives = ["high", "high-pitched", "blue", "blue-eyed", "a b", "a", "old", "old", "x-rated", "ad hoc", "Zed"]
    nouns = ["pitched-up", "eyed", "cat", "ATM", "ice-cream", "b", "zebra", "x", "cat"]
    view = AdjectiveNounWords(adjectives, nouns)
    assert list(view) == sorted({f"{a}-{n}" for a in adjectives for n in nouns})
    assert view[-1] == list(view)[-1] and view[2:5] == list(view)[2:5]
    assert len(rs.adjective_noun_words()) == 6_175_260  # wonderwords 2.2.0, as pinned


def test_split_sentences_is_deterministic_and_lossless():
    text = 'He said "Stop." Then he left! Did he? Yes. 3 cats ran. e.g. lowercase stays.'
    sentences = split_sentences(text)
    assert sentences == ['He said "Stop."', "Then he left!", "Did he?", "Yes.", "3 cats ran. e.g. lowercase stays."]
    assert " ".join(sentences) == text
