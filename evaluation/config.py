"""A sweep's configuration: dataclass defaults < YAML file (``--config``) < command-line flags, validated once.

Lists (presses, ratios, thresholds, datasets) accept Python lists, YAML lists or comma-separated strings
(``--press knorm,snapkv --compression_ratio 0.25,0.5``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evaluation.datasets.ruler_synthetic import RulerSources, resolve_tasks
from presses import PRESSES, get_spec
from presses.registry import KNOBS

DEFAULT_MODEL = "kvtiny"


class ConfigError(ValueError):
    """A bad setting; the one-line message names it and the fix."""


def option(default, help: str, factory: bool = False):
    """A setting with its ``--help`` line; list defaults are copied per instance."""
    if factory:
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class EvalConfig:
    """Every setting of ``kvpress-eval``; ``kvpress-eval --help`` prints them with their help lines."""

    model: str = option(DEFAULT_MODEL, "embedded short name (kvtiny), local model folder, or hub name")
    press: list = option(["no_press", "streaming_llm", "snapkv", "expected_attention", "kvzip", "kvzap_mlp"],
                         "presses to sweep (kvpress-eval presses)", factory=True)
    compression_ratio: list = option([0.5], "points for ratio presses: fraction of KV pairs removed, in [0, 1)",
                                     factory=True)
    threshold: list = option([-4.0], "points for threshold presses (kvzap_*): evict pairs scoring below",
                             factory=True)
    head_compression_ratio: list = option([0.5], "points for head presses (duo_attention*): fraction of heads made "
                                          "streaming heads, in [0, 1]", factory=True)
    dataset: list = option(["ruler"], "datasets: ruler, longbench, longbench_e, aime25", factory=True)
    ruler_length: int = option(1024, "context length in tokens of RULER generated offline")
    ruler_tasks: list = option([], "RULER tasks (default: every task that needs no data file)", factory=True)
    essay_path: str | None = option(None, "RULER: essay text for the essay-haystack NIAH tasks (enables them)")
    squad_path: str | None = option(None, "RULER: SQuAD v2.0 dev json for qa_1 (enables it)")
    hotpotqa_path: str | None = option(None, "RULER: HotpotQA dev distractor json for qa_2 (enables it)")
    data_dir: str | None = option(None, "hub config: RULER length (e.g. 4096) or one LongBench subset")
    data_files: dict = option({}, "local .jsonl/.parquet in the common layout instead of the hub: PATH (one "
                              "dataset) or DATASET=PATH,DATASET=PATH", factory=True)
    max_samples: int | None = option(10, "at most this many samples per task (None: all)")
    fraction: float = option(1.0, "then keep this fraction of them")
    max_context_length: int | None = option(None, "cut longer contexts to this many tokens (LongBench: middle cut)")
    max_new_tokens: int | None = option(None, "answer length (default: the dataset's)")
    query_aware: bool = option(False, "put the question inside the compressed context")
    decoding: bool = option(False, "threshold presses also prune generated tokens (DMS decoding=True)")
    do_sample: bool = option(False, "sample instead of greedy decoding")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling")
    top_k: int = option(0, "top-k sampling (0: off)")
    min_p: float = option(0.0, "min-p sampling (0: off)")
    num_samples: int = option(1, "generations per question (sampled decoding; avg@k, pass@k)")
    enable_thinking: bool = option(False, "chat template thinking mode (Qwen3)")
    seed: int = option(0, "seed of sampled decoding and random presses")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    dtype: str = option("auto", "auto, float32, bfloat16 or float16")
    attn_implementation: str = option("sdpa", "sdpa or eager (observed_attention needs eager)")
    output_dir: str = option("results/runs", "where run folders go")
    overwrite: bool = option(False, "start cached runs over instead of resuming them")


def help_text() -> str:
    lines = ["kvpress-eval [--config sweep.yaml] [--FLAG VALUE ...]   (lists: comma-separated)", "",
             "  --config                 YAML file of settings; flags given here override it"]
    for item in dataclasses.fields(EvalConfig):
        default = item.default if item.default_factory is dataclasses.MISSING else item.default_factory()
        lines.append(f"  --{item.name:<23}{item.metadata['help']} [default: {default}]")
    lines += ["", "Other commands:",
              "  kvpress-eval presses                               the press registry, with each press's knob",
              "  kvpress-eval smoke                                 every press on a tiny random model",
              "  kvpress-eval export --results DIR --out DIR        runs in kvpress's layout (predictions.csv, ...)",
              "  kvpress-eval import --source DIR --output_dir DIR  kvpress runs into this layout, rescored",
              "  kvpress-eval leaderboard --results DIR --out DIR   static site: accuracy versus compression",
              "  kvpress-eval compare --baseline B --results DIR    fails (exit 1) on a regression against B",
              "  kvpress-eval train-kvzap --model M --output_dir D  KVzap surrogates for a model",
              "  kvpress-eval build-duo-patterns --model M --output_dir D   DuoAttention head patterns",
              "  kvpress-eval build-qfilters --model M --output_dir D       Q-Filters",
              "  kvpress-eval train-fastkvzip --model M --output_dir D      Fast KVzip gates"]
    return "\n".join(lines)


LIST_FIELDS = ("press", "compression_ratio", "threshold", "head_compression_ratio", "dataset", "ruler_tasks")
FLOAT_LIST_FIELDS = ("compression_ratio", "threshold", "head_compression_ratio")
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(EvalConfig))


def _as_list(name: str, value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if name in FLOAT_LIST_FIELDS:
        try:
            return [float(item) for item in items]
        except (TypeError, ValueError):
            raise ConfigError(f"--{name} takes numbers (e.g. --{name} 0.25,0.5), got {value!r}") from None
    return [str(item) for item in items]


def read_yaml(path: str) -> dict:
    """The settings of a YAML sweep file, or a one-line error."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file '{path}' does not exist: check the path given to --config")
    try:
        settings = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: fix its syntax") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of settings (e.g. 'press: [knorm]')")
    return settings


def resolve_config(config_file: str | None = None, **cli) -> EvalConfig:
    """Defaults, then the YAML file, then command-line flags; unknown settings are errors with suggestions."""
    settings = read_yaml(config_file) if config_file else {}
    settings.update({name: value for name, value in cli.items() if value is not None})
    unknown = [name for name in settings if name not in FIELD_NAMES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], FIELD_NAMES, n=1)
        hint = f"did you mean --{close[0]}? " if close else ""
        raise ConfigError(f"unknown setting '{unknown[0]}': {hint}see kvpress-eval --help")
    for name in LIST_FIELDS:
        if name in settings:
            settings[name] = _as_list(name, settings[name])
    datasets = settings.get("dataset", EvalConfig().dataset)
    if "data_files" in settings:
        settings["data_files"] = _data_files(settings["data_files"], datasets)
    config = EvalConfig(**settings)
    validate(config)
    check_knobs(config, given=set(settings))
    return config


def _data_files(value, datasets: list[str]) -> dict[str, str]:
    """``--data_files`` as {dataset: path}: a mapping (YAML), ``name=path,name=path``, or one path for one dataset."""
    if isinstance(value, dict):
        files = {str(name): str(path) for name, path in value.items()}
    else:
        items = _as_list("data_files", value)
        if all("=" in item for item in items):
            files = dict(item.split("=", 1) for item in items)
        elif len(items) == 1 and len(datasets) == 1:
            files = {datasets[0]: items[0]}
        else:
            raise ConfigError("--data_files with several datasets needs DATASET=PATH pairs "
                              "(e.g. --data_files ruler=r.jsonl,longbench=lb.parquet)")
    for name, path in files.items():
        if name not in datasets:
            raise ConfigError(f"--data_files names '{name}', which is not in --dataset ({', '.join(datasets)})")
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"--data_files: '{path}' does not exist: give a .jsonl or .parquet file")
    return files


def check_knobs(config: EvalConfig, given: set[str]) -> None:
    """A knob given explicitly must be taken by at least one press, or it would be silently ignored."""
    knobs = {get_spec(name).knob for name in config.press}
    for knob in KNOBS:
        if knob in given and getattr(config, knob) and knob not in knobs:
            takers = sorted(name for name, spec in PRESSES.items() if spec.knob == knob)
            raise ConfigError(f"--{knob} is not taken by {', '.join(config.press)}: presses with a {knob} are "
                              f"{', '.join(takers[:6])}{', ...' if len(takers) > 6 else ''}")


def validate(config: EvalConfig) -> None:
    for ratio in config.compression_ratio:
        if not 0 <= ratio < 1:
            raise ConfigError(f"--compression_ratio must be in [0, 1) (fraction of KV pairs removed), got {ratio}")
    for ratio in config.head_compression_ratio:
        if not 0 <= ratio <= 1:
            raise ConfigError(f"--head_compression_ratio must be in [0, 1] (fraction of heads), got {ratio}")
    if not config.press:
        raise ConfigError("no press given: pass --press (e.g. --press knorm,snapkv)")
    if not config.dataset:
        raise ConfigError("no dataset given: pass --dataset (e.g. --dataset ruler)")
    if not 0 < config.fraction <= 1:
        raise ConfigError(f"--fraction must be in (0, 1], got {config.fraction}")
    if config.max_samples is not None and config.max_samples < 1:
        raise ConfigError(f"--max_samples must be at least 1, got {config.max_samples}")
    if config.num_samples < 1:
        raise ConfigError(f"--num_samples must be at least 1, got {config.num_samples}")
    if config.num_samples > 1 and not config.do_sample:
        raise ConfigError("--num_samples above 1 needs sampled decoding: add --do_sample")
    if config.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got '{config.dtype}'")
    if config.attn_implementation not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3"):
        raise ConfigError(f"--attn_implementation must be sdpa or eager, got '{config.attn_implementation}'")
    if config.ruler_length < 64:
        raise ConfigError(f"--ruler_length must be at least 64 tokens, got {config.ruler_length}")
    for name in config.press:
        get_spec(name)  # unknown press: a one-line error with close matches
    if "ruler" in config.dataset and config.data_dir is None and "ruler" not in config.data_files:
        try:
            resolve_tasks(config.ruler_tasks or None, ruler_sources(config))
        except ValueError as error:
            raise ConfigError(str(error).replace("pass essay_path=", "pass --essay_path ")
                              .replace("pass squad_path=", "pass --squad_path ")
                              .replace("pass hotpotqa_path=", "pass --hotpotqa_path ")) from None


def ruler_sources(config: EvalConfig) -> RulerSources:
    return RulerSources(config.essay_path, config.squad_path, config.hotpotqa_path)


def to_dict(config: EvalConfig) -> dict:
    return dataclasses.asdict(config)
