"""The embedded model's training script, end to end on a tiny configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluation.config import ConfigError, read_yaml
from evaluation.embedded.train import (
    COPY_TASK,
    REPEAT_INSTRUCTION,
    SMOKE,
    TaskSampler,
    TrainConfig,
    batch_loss,
    build_model,
    encode_example,
    is_far_needle,
    train,
    train_recipe,
)
from evaluation.models import EMBEDDED_MODELS


def test_smoke_training_saves_a_loadable_model_and_resumes(tmp_path):
    train(str(tmp_path), smoke=True)
    log = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5]
    assert {"niah_single_1", "vt", COPY_TASK} <= set(log[-1]["eval"])

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert model.config.model_type == "qwen3"
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # GQA
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.tokenize("1234567") == list("1234567")  # digits are single tokens

    # A second run with more steps resumes from the checkpoint instead of starting over.
    train(str(tmp_path), smoke=True, stages=[[512, 3], [768, 4]])
    log = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6, 7]
    resumed = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert not torch.equal(resumed.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_copy_examples_use_kvzips_repeat_prompt_and_train_on_the_repetition(tmp_path):
    train(str(tmp_path), smoke=True, stages=[[512, 1]], eval_every=100)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    record = {"task": COPY_TASK, "context": "The grass is green. Here we go.", "question": "", "answer_prefix": "",
              "answer": []}
    ids, mask = encode_example(tokenizer, record)
    text = tokenizer.decode(ids)
    assert REPEAT_INSTRUCTION in text
    target = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert target == "The grass is green. Here we go.<|im_end|>"


def test_phase_two_starts_from_given_weights_replays_shorter_lengths_and_resumes(tmp_path):
    first, second = tmp_path / "phase1", tmp_path / "phase2"
    train(str(first), smoke=True)  # 5 phase-1 steps
    # Shift the saved weights far from anything the seeded initialisation or 5 steps could give, so that staying
    # near them proves they were loaded.
    phase_one = AutoModelForCausalLM.from_pretrained(str(first))
    with torch.no_grad():
        phase_one.model.embed_tokens.weight.add_(0.5)
    phase_one.save_pretrained(str(first))
    train(str(second), smoke=True, init_from=str(first), long_stages=[[768, 1]], replay=1.0, eval_every=100)
    log = [json.loads(line) for line in (second / "training_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [6]  # phase 1 skipped
    assert AutoTokenizer.from_pretrained(str(second)).get_vocab() == AutoTokenizer.from_pretrained(
        str(first)).get_vocab()
    tuned = AutoModelForCausalLM.from_pretrained(str(second))
    # One step (learning rate <= 1e-3) moved the given weights a little: they were loaded, then trained.
    moved = (tuned.model.embed_tokens.weight - phase_one.model.embed_tokens.weight).abs().max()
    assert 0 < moved < 0.1

    # Resuming prefers the run's own checkpoint to init_from; replay=1 trains every step at the shorter length.
    train(str(second), smoke=True, init_from=str(first), long_stages=[[768, 3]], replay=1.0, eval_every=100)
    log = [json.loads(line) for line in (second / "training_log.jsonl").read_text().splitlines()]
    assert [(entry["step"], entry["length"]) for entry in log] == [(6, 512), (7, 512), (8, 512)]
    assert json.loads((second / "train_config.json").read_text())["init_from"] == str(first)


def test_per_example_loss_gives_a_short_answer_the_weight_of_a_long_one():
    """Two examples: one with 1 answer token, one with 8. The token mean weighs the short one 1/9; the per-example
    mean weighs it 1/2. Checked against losses computed one example at a time."""
    torch.manual_seed(0)
    model = build_model(TrainConfig(**SMOKE), _tiny_tokenizer())
    ids = torch.randint(3, 300, (2, 12))
    answer_mask = torch.zeros(2, 12)
    answer_mask[0, 11] = 1  # one answer token
    answer_mask[1, 4:] = 1  # eight
    batch = {"input_ids": ids, "answer_mask": answer_mask, "attention_mask": torch.ones_like(ids)}
    alone = [batch_loss(model, {k: v[i:i + 1] for k, v in batch.items()})[0] for i in range(2)]
    token_mean, _ = batch_loss(model, batch)
    per_example, _ = batch_loss(model, batch, per_example=True)
    torch.testing.assert_close(per_example, (alone[0] + alone[1]) / 2)
    torch.testing.assert_close(token_mean, (alone[0] + 8 * alone[1]) / 9)
    assert not torch.allclose(per_example, token_mean)


def _tiny_tokenizer():
    class Tokenizer:
        def __len__(self) -> int:
            return 400

        eos_token_id, pad_token_id = 2, 0

    return Tokenizer()


def test_rope_scaling_reaches_the_saved_model(tmp_path):
    """Phase 2 can extend a model's RoPE (YaRN): the saved config carries it, so loading applies it."""
    first, second = tmp_path / "phase1", tmp_path / "phase2"
    train(str(first), smoke=True)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    train(str(second), smoke=True, init_from=str(first), long_stages=[[768, 1]], eval_every=100, rope_scaling=yarn)
    loaded = AutoModelForCausalLM.from_pretrained(str(second))
    assert loaded.config.rope_parameters["rope_type"] == "yarn"
    assert loaded.model.rotary_emb.attention_scaling > 1  # YaRN's attention temperature is on
    plain = AutoModelForCausalLM.from_pretrained(str(first))
    assert plain.config.rope_parameters["rope_type"] == "default"


def test_far_needle_share_resamples_multi_key_depths_and_leaves_other_tasks_alone():
    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_MODELS["kvtiny"]))

    def far_share(task: str, share: float | None) -> float:
        sampler = TaskSampler(TrainConfig(far_needle_share=share, pool_size=16), tokenizer, seed=0)
        return sum(is_far_needle(sampler._draw(task, 512)) for _ in range(60)) / 60

    uniform, resampled = far_share("niah_multikey_2", None), far_share("niah_multikey_2", 0.8)
    assert 0.15 < uniform < 0.5 < 0.65 < resampled  # about a third, then about 0.8
    assert far_share("niah_single_1", 0.8) < 0.5  # single needles keep the generator's uniform depths


def test_a_share_outside_its_range_is_a_one_line_error_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="far_needle_share"):
        TrainConfig(far_needle_share=0)
    with pytest.raises(ConfigError, match="replay"):
        TrainConfig(replay=1.5)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "evaluation.embedded.train", "--output_dir", str(out),
                           "--far_needle_share", "1.5"], capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "train: --far_needle_share 1.5 is not a share: give a number in (0, 1], or leave it out for the generator's "
        "uniform depths"]
    assert not out.exists()


def test_a_recipe_chains_runs_from_each_others_weights_and_a_rerun_resumes(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("runs:\n"
                      "  - {name: base, smoke: true}\n"
                      "  - {name: longer, smoke: true, long_stages: [[768, 2]], replay: 0.0, eval_every: 100}\n")
    out = tmp_path / "out"
    assert train_recipe(str(recipe), str(out)) == {"step": 7, "total_steps": 7}
    assert json.loads((out / "longer" / "train_config.json").read_text())["init_from"] == str(out / "base")
    longer_log = (out / "longer" / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in longer_log] == [6, 7]  # phase 1 came from base's weights
    base_log = (out / "base" / "training_log.jsonl").read_text()
    train_recipe(str(recipe), str(out))  # finished runs are passed over, not retrained
    assert (out / "base" / "training_log.jsonl").read_text() == base_log
    assert (out / "longer" / "training_log.jsonl").read_text().splitlines() == longer_log

    recipe.write_text("runs:\n  - {smoke: true}\n")
    with pytest.raises(ConfigError, match="needs a name"):
        train_recipe(str(recipe), str(out))
    recipe.write_text("runs:\n  - {name: other, smoke: true, init_from: somewhere}\n")
    with pytest.raises(ConfigError, match="sets init_from"):
        train_recipe(str(recipe), str(out))
    done = subprocess.run([sys.executable, "-m", "evaluation.embedded.train", "recipe", "--recipe",
                           str(tmp_path / "missing.yaml"), "--output_dir", str(out)], capture_output=True, text=True)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1 and "missing.yaml" in done.stderr


def test_the_4k_recipe_holds_the_settings_its_committed_runs_logged():
    """The one-command recipe must stay the runs whose weights and held-out results are committed."""
    embedded = EMBEDDED_MODELS["kvtiny"].parent
    recipe = read_yaml(str(embedded / "recipes" / "kvtiny-4k.yaml"), option="--recipe")
    assert [run["name"] for run in recipe["runs"]] == ["d", "e", "g", "h", "i"]
    start = json.loads((embedded.parents[1] / recipe["init_from"] / "train_config.json").read_text())
    assert "init_from" not in start and not start.get("long_stages"), "the recipe starts from phase 1 alone (kvtiny v1)"
    for run in recipe["runs"]:
        settings = {key: value for key, value in run.items() if key != "name"}
        run_dir = embedded / "experiments" / f"issue19-phase2{run['name']}"
        logged = json.loads((run_dir / "train_config.json").read_text())
        logged.pop("init_from")
        assert asdict(TrainConfig(**settings)) == {**asdict(TrainConfig()), **logged}, run["name"]
