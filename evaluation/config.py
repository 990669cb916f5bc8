"""A sweep's configuration: dataclass defaults < YAML file (``--config``) < command-line flags, validated once.

Lists (presses, ratios, thresholds, datasets) accept Python lists, YAML lists or comma-separated strings
(``--press knorm,snapkv --compression_ratio 0.25,0.5``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evaluation.datasets.ruler_synthetic import RulerSources, resolve_tasks
from presses import PRESSES, get_spec
from presses.registry import KNOBS

DEFAULT_MODEL = "kvtiny"
EXECUTORS = ("local", "ray")


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
    key_channel_compression_ratio: list = option([0.5], "points for key-channel presses (think): fraction of key "
                                                 "channels zeroed, in [0, 1)", factory=True)
    head_compression_ratio: list = option([0.5], "points for head presses (duo_attention*): fraction of heads made "
                                          "streaming heads, in [0, 1]", factory=True)
    dataset: list = option(["ruler"], "datasets: ruler, longbench, longbench_e (or longbench-e), longbench-v2, "
                           "loogle, zero_scrolls, infinitebench, needle_in_haystack, aime25, math500", factory=True)
    ruler_length: int | list = option(4096, "context length in tokens of RULER generated offline; several "
                                      "(1024,4096) make one dataset per length: ruler-1024, ruler-4096")
    ruler_tasks: list = option([], "RULER tasks (default: every task that needs no data file)", factory=True)
    essay_path: str | None = option(None, "RULER: essay text for the essay-haystack NIAH tasks (enables them)")
    squad_path: str | None = option(None, "RULER: SQuAD v2.0 dev json for qa_1 (enables it)")
    hotpotqa_path: str | None = option(None, "RULER: HotpotQA dev distractor json for qa_2 (enables it)")
    needle_lengths: list = option([1024], "needle_in_haystack: context lengths in tokens of the grid",
                                  factory=True)
    needle_depths: list = option([0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0],
                                 "needle_in_haystack: needle depths in percent of the haystack (0-100)",
                                 factory=True)
    needle_haystack: str | None = option(None, "needle_in_haystack: haystack text, a .txt/.jsonl/.parquet file "
                                         "or a hub name (alessiodevoto/paul_graham_essays) [default: built in]")
    data_dir: str | None = option(None, "hub config: RULER length (e.g. 4096) or one LongBench subset")
    data_files: dict = option({}, "local .jsonl/.parquet in the common layout instead of the hub: PATH (one "
                              "dataset) or DATASET=PATH,DATASET=PATH", factory=True)
    max_samples: int | None = option(10, "at most this many samples per task (null, None or all: every sample)")
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
    engine: str = option("batched", "batched: one prefill per context for every press and point, answers decoded in "
                         "batches; sequential: one context and one run at a time (for comparison)")
    batch_size: int | None = option(None, "rows decoded together by the batched engine (default: 32 on CPU, "
                                    "what half the free memory holds on GPU)")
    kv_storage: str = option("compact", "compact: evicted KV pairs are freed (the default); mask: every pair stays "
                             "in memory and evicted ones are masked, as kvpress does (same predictions)")
    prefill_chunk_size: int | None = option(None, "threshold presses (dms, kvzap_*): prefill the context in chunks of "
                                            "this many tokens, evicting after each (DMS's inference; bounds the "
                                            "prefill's KV memory; changes predictions, so it is part of the run id)")
    output_dir: str = option("results/runs", "where run folders go")
    overwrite: bool = option(False, "start cached runs over instead of resuming them")
    executor: str = option("local", "local (this process) or ray (cells spread over a Ray cluster; pip install "
                           "-e '.[ray]')")
    ray_address: str | None = option(None, "Ray cluster to join (e.g. auto, ray://head:10001; default: start a "
                                     "local one)")
    workers: int | None = option(None, "Ray workers, each loading the model once (default: one per GPU of the "
                                 "cluster, else CPUs / --num_threads)")
    shard: str | None = option(None, "i/n: run only shard i (0-based) of n, a deterministic split of the cells "
                               "(SLURM arrays)")
    num_threads: int | None = option(None, "torch CPU threads per process (default: $OMP_NUM_THREADS, else half "
                                     "the CPUs this process may use)")


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


LIST_FIELDS = ("press", *KNOBS, "dataset", "ruler_tasks", "needle_lengths", "needle_depths")
FLOAT_LIST_FIELDS = (*KNOBS, "needle_depths")
INT_LIST_FIELDS = ("needle_lengths",)
NEEDLE_FIELDS = ("needle_lengths", "needle_depths", "needle_haystack")
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
        numbers = []
        for item in items:
            try:
                number = None if isinstance(item, bool) else float(item)
            except (TypeError, ValueError):
                number = None
            if number is None or number != number or abs(number) == float("inf"):
                raise ConfigError(f"--{name} takes numbers (e.g. --{name} 0.25,0.5), got {value!r}")
            numbers.append(number)
        return numbers
    if name in INT_LIST_FIELDS:
        try:
            return [_whole(item) for item in items]
        except (TypeError, ValueError):
            raise ConfigError(f"--{name} takes whole numbers (e.g. --{name} 512,1024), got {value!r}") from None
    if any(isinstance(item, (list, tuple, dict, bool)) for item in items):
        raise ConfigError(f"--{name} takes names (e.g. --{name} a,b), got {value!r}")
    return [str(item) for item in items]


def _whole(item) -> int:
    number = float(item)
    if not number.is_integer():
        raise ValueError(item)
    return int(number)


def _ruler_lengths(value) -> int | list[int]:
    """``--ruler_length``: one length (an int, the single-length default's run ids unchanged) or several."""
    try:
        lengths = [_whole(item) for item in (_as_list("ruler_length", value) if not isinstance(value, (int, float))
                                             else [value])]
    except (TypeError, ValueError):
        raise ConfigError(f"--ruler_length takes whole numbers (e.g. --ruler_length 1024,4096), got {value!r}") \
            from None
    if not lengths:
        raise ConfigError("--ruler_length is empty: give a length in tokens (e.g. --ruler_length 1024)")
    return lengths[0] if len(lengths) == 1 else list(dict.fromkeys(lengths))


DATASET_ALIASES = {"longbench-e": "longbench_e"}  # kvpress's spelling of a dataset -> ours
RULER_LENGTH_PREFIX = "ruler-"  # the sweep's name for RULER at one of several lengths: ruler-4096


def canonical_name(name: str) -> str:
    """Our name for a dataset given in kvpress's spelling (``longbench-e`` -> ``longbench_e``)."""
    return DATASET_ALIASES.get(name, name)


def expand_datasets(datasets: list[str], ruler_length: int | list[int]) -> list[str]:
    """Datasets as the sweep runs them: kvpress spellings in ours, and ``ruler`` once per length when several."""
    expanded: list[str] = []
    for name in datasets:
        name = canonical_name(name)
        if name == "ruler" and isinstance(ruler_length, list):
            expanded.extend(f"{RULER_LENGTH_PREFIX}{length}" for length in ruler_length)
        else:
            expanded.append(name)
    return list(dict.fromkeys(expanded))


def read_yaml(path: str, option: str = "--config") -> dict:
    """The settings of a YAML file given to ``option`` (a sweep file by default), or a one-line error."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file '{path}' does not exist: check the path given to {option}")
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


NONE_WORDS = ("none", "null", "~")
ALL_MEANS_NONE = ("max_samples",)  # --max_samples all: every sample
FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(EvalConfig)}


def coerce(name: str, value, kind: str):
    """``value`` as the type ``kind`` names (``int``, ``float | None``, ``str``, ``bool``, ...), or a one-line error.

    Command-line values arrive parsed by Fire (``--seed 3`` is an int, ``--model 123`` too) and YAML values typed
    by YAML; both go through here, so ``--max_samples abc`` fails by name instead of deep inside the sweep.
    ``null``, ``None`` and ``~`` mean None where a setting may be None (``--max_samples all`` too).
    """
    optional = kind.replace(" ", "").endswith("|None")
    base = kind.replace(" ", "").removesuffix("|None")
    none_words = NONE_WORDS + (("all",) if name in ALL_MEANS_NONE else ())
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in none_words)):
        return None
    if base in ("list", "dict") or "list" in base.split("|"):  # lists have their own parsers (_as_list, ...)
        return value
    if value is None:
        raise ConfigError(f"--{name} needs a value (see kvpress-eval --help)")
    if isinstance(value, (list, tuple, dict)) and base != "str":
        raise ConfigError(f"--{name} takes one {'number' if base in ('int', 'float') else 'value'}, got {value!r}")
    if base == "bool":
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in words and not isinstance(value, float):
            return words[str(value).strip().lower()]
        raise ConfigError(f"--{name} is a switch: give it alone (--{name}) or as --{name} true/false, got {value!r}")
    if base in ("int", "float"):
        number = None
        if not isinstance(value, bool):
            try:
                number = float(value) if base == "float" or isinstance(value, float) else int(str(value).strip())
            except (TypeError, ValueError):
                number = None
        if number is None or number != number or number in (float("inf"), float("-inf")):
            example = "10" if base == "int" else "0.5"
            raise ConfigError(f"--{name} takes a {'whole ' if base == 'int' else ''}number (e.g. --{name} {example}),"
                              f" got {value!r}")
        if base == "int":
            if float(number) != int(number):
                raise ConfigError(f"--{name} takes a whole number, got {value!r}")
            return int(number)
        return float(number)
    if base == "str":
        if isinstance(value, (list, tuple, dict, bool)):
            raise ConfigError(f"--{name} takes one text value, got {value!r}")
        if not str(value).strip():
            raise ConfigError(f"--{name} is empty: give a value or leave the flag out (see kvpress-eval --help)")
        return str(value)
    return value


def resolve_config(config_file: str | None = None, **cli) -> EvalConfig:
    """Defaults, then the YAML file, then command-line flags; unknown settings are errors with suggestions.

    A flag given as None on the command line (``--max_samples None``) sets None; every value is checked for its
    type here, before anything heavy runs.
    """
    settings = read_yaml(config_file) if config_file else {}
    settings.update(cli)
    unknown = [name for name in settings if name not in FIELD_NAMES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], FIELD_NAMES, n=1)
        hint = f"did you mean --{close[0]}? " if close else ""
        raise ConfigError(f"unknown setting '{unknown[0]}': {hint}see kvpress-eval --help")
    for name in list(settings):
        settings[name] = coerce(name, settings[name], FIELD_TYPES[name])
    for name in LIST_FIELDS:
        if name in settings:
            settings[name] = _as_list(name, settings[name])
    if "ruler_length" in settings:
        settings["ruler_length"] = _ruler_lengths(settings["ruler_length"])
    datasets = expand_datasets(settings.get("dataset", EvalConfig().dataset),
                               settings.get("ruler_length", EvalConfig().ruler_length))
    if "dataset" in settings:
        settings["dataset"] = datasets
    if "data_files" in settings:
        settings["data_files"] = _data_files(settings["data_files"], datasets)
    config = EvalConfig(**settings)
    validate(config)
    check_knobs(config, given=set(settings))
    check_needle_flags(config, given=set(settings))
    return config


def _data_files(value, datasets: list[str]) -> dict[str, str]:
    """``--data_files`` as {dataset: path}: a mapping (YAML), ``name=path,name=path``, or one path for one dataset."""
    if isinstance(value, dict):
        files = {canonical_name(str(name)): str(path) for name, path in value.items()}
    else:
        items = _as_list("data_files", value)
        if all("=" in item for item in items):
            files = {canonical_name(name): path for name, path in (item.split("=", 1) for item in items)}
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
    for ratio in config.key_channel_compression_ratio:
        if not 0 <= ratio < 1:
            raise ConfigError(f"--key_channel_compression_ratio must be in [0, 1) (fraction of key channels "
                              f"zeroed), got {ratio}")
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
        raise ConfigError("--attn_implementation must be sdpa, eager, flash_attention_2 or flash_attention_3, got "
                          f"'{config.attn_implementation}'")
    if config.engine not in ("batched", "sequential"):
        raise ConfigError(f"--engine must be batched or sequential, got '{config.engine}'")
    if config.kv_storage not in ("compact", "mask"):
        raise ConfigError(f"--kv_storage must be compact or mask, got '{config.kv_storage}'")
    if config.prefill_chunk_size is not None and (isinstance(config.prefill_chunk_size, bool) or not isinstance(
            config.prefill_chunk_size, int) or config.prefill_chunk_size < 1):
        raise ConfigError(f"--prefill_chunk_size must be a positive integer, got {config.prefill_chunk_size!r}")
    if config.batch_size is not None and (isinstance(config.batch_size, bool) or not isinstance(config.batch_size, int)
                                          or config.batch_size < 1):
        raise ConfigError(f"--batch_size must be a positive integer, got {config.batch_size!r}")
    lengths = config.ruler_length if isinstance(config.ruler_length, list) else [config.ruler_length]
    lengths = lengths + [int(name[len("ruler-"):]) for name in config.dataset
                         if name.startswith("ruler-") and name[len("ruler-"):].isdigit()]
    for length in lengths:
        if length < 64:
            raise ConfigError(f"--ruler_length must be at least 64 tokens, got {length}")
    for name in ("max_context_length", "max_new_tokens", "num_threads", "workers"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(config, name)}")
    if config.temperature <= 0:
        raise ConfigError(f"--temperature must be above 0, got {config.temperature}")
    if not 0 < config.top_p <= 1:
        raise ConfigError(f"--top_p must be in (0, 1], got {config.top_p}")
    if config.top_k < 0:
        raise ConfigError(f"--top_k must be 0 (off) or more, got {config.top_k}")
    if not 0 <= config.min_p <= 1:
        raise ConfigError(f"--min_p must be in [0, 1], got {config.min_p}")
    if config.seed < 0:
        raise ConfigError(f"--seed must be 0 or more, got {config.seed}")
    if config.executor not in EXECUTORS:
        raise ConfigError(f"--executor must be {' or '.join(EXECUTORS)}, got '{config.executor}'")
    if config.executor != "ray" and (config.ray_address is not None or config.workers is not None):
        raise ConfigError("--ray_address and --workers need --executor ray")
    parse_shard(config.shard)
    for name in config.press:
        get_spec(name)  # unknown press: a one-line error with close matches
    validate_needle(config)
    # RULER generated offline: "ruler" without --data_dir, every "ruler-<length>"; none read from --data_files.
    generated = [name for name in config.dataset if name not in config.data_files
                 and ((name == "ruler" and config.data_dir is None) or name.startswith("ruler-"))]
    if generated:
        try:
            resolve_tasks(config.ruler_tasks or None, ruler_sources(config))
        except ValueError as error:
            raise ConfigError(str(error).replace("pass essay_path=", "pass --essay_path ")
                              .replace("pass squad_path=", "pass --squad_path ")
                              .replace("pass hotpotqa_path=", "pass --hotpotqa_path ")) from None


def validate_needle(config: EvalConfig) -> None:
    """The needle grid's rules that need no tokenizer (the needle's own length is checked when it is tokenized)."""
    from evaluation.datasets.needle import NeedleError, check_grid

    if "needle_in_haystack" not in config.dataset:
        return
    try:
        check_grid(config.needle_lengths, config.needle_depths)
    except NeedleError as error:
        raise ConfigError(str(error)) from None
    haystack = config.needle_haystack
    if haystack and Path(haystack).suffix in (".txt", ".jsonl", ".json", ".parquet") \
            and not Path(haystack).expanduser().is_file():
        raise ConfigError(f"--needle_haystack '{haystack}' does not exist: give a .txt, .jsonl or .parquet file "
                          "or a hub dataset name")


def check_needle_flags(config: EvalConfig, given: set[str]) -> None:
    """Needle flags given explicitly without --dataset needle_in_haystack would be silently ignored."""
    unused = [name for name in NEEDLE_FIELDS if name in given]
    if unused and "needle_in_haystack" not in config.dataset:
        raise ConfigError(f"--{unused[0]} is only used by --dataset needle_in_haystack, which is not in --dataset "
                          f"({', '.join(config.dataset)})")


def check_writable_folder(path: str, flag: str = "--output_dir") -> None:
    """``path`` is a folder that exists and can be written, or can be created; checked without creating anything."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} '{path}' is a file: give a folder")
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} '{path}' cannot be created: '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "written" if existing == folder else f"created ('{existing}' is not writable)"
        raise ConfigError(f"{flag} '{path}' cannot be {what}: choose a folder you can write to")


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"i/n"`` as (i, n) with 0 <= i < n; None for no sharding."""
    if shard is None:
        return None
    index, _, count = str(shard).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ConfigError(f"--shard takes i/n with 0 <= i < n (e.g. --shard 0/4 for the first of 4 shards), got "
                          f"'{shard}'")
    return i, n


def default_num_threads(workers_here: int = 1) -> int:
    """Torch CPU threads per process when --num_threads is not given: ``$OMP_NUM_THREADS`` if set, else half the
    CPUs this process may use, shared among ``workers_here`` processes on the machine, and at least 1.

    Half, because torch's default (every core) oversubscribes a machine that does anything else: measured on a
    shared 2-core machine, 2 threads against one competing process ran a sweep 2x slower than 1 thread.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // 2 // max(1, workers_here))


def ruler_sources(config: EvalConfig) -> RulerSources:
    return RulerSources(config.essay_path, config.squad_path, config.hotpotqa_path)


def to_dict(config: EvalConfig) -> dict:
    return dataclasses.asdict(config)
