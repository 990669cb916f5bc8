"""The ``kvpress-eval`` command.

``kvpress-eval [--FLAG VALUE ...]`` runs a sweep (see ``kvpress-eval --help``). Commands: ``presses`` (the press
registry), ``smoke`` (every press on a tiny random model), ``export`` / ``import`` (kvpress's results layout),
``train-kvzap`` (KVzap surrogates for a model), ``build-duo-patterns``, ``build-qfilters`` and ``train-fastkvzip``
(DuoAttention patterns, Q-Filters, Fast KVzip gates for a model), ``compare`` (results against a baseline; exit 1
on a regression), ``leaderboard`` (the static site). Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import sys
import time

import fire

from evaluation.cache import CacheError
from evaluation.config import DEFAULT_MODEL, ConfigError, check_writable_folder, coerce, help_text, resolve_config
from presses import PRESSES, PressError, build_press

paths = "paths"  # the type hint of a flag that takes one folder or several, comma-separated


def checked(func):
    """Every argument of a command checked against its type hint before the command runs (``--tolerance abc``,
    ``--epochs -1.5``, ``--out ''``): a one-line error instead of a traceback. ``paths`` hints take a folder or a
    comma-separated list of folders."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name, value in list(bound.arguments.items()):
            kind = signature.parameters[name].annotation
            if kind == "paths":
                bound.arguments[name] = _paths(name, value)
            elif isinstance(kind, str) and signature.parameters[name].kind is not inspect.Parameter.VAR_KEYWORD:
                bound.arguments[name] = coerce(name, value, kind)
        return func(*bound.args, **bound.kwargs)

    return wrapper


def _paths(name: str, value) -> list[str]:
    items = [str(v).strip() for v in value] if isinstance(value, (list, tuple)) else str(value).split(",")
    items = [item.strip() for item in items if item.strip()]
    if not items or isinstance(value, bool):
        raise ConfigError(f"--{name} takes a folder or comma-separated folders, got {value!r}")
    return items


def check_flags(func, argv: list[str], command: str) -> None:
    """Unknown flags and surplus positional arguments of a command, as one-line errors (Fire would print its usage
    page)."""
    parameters = inspect.signature(func).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    names = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    positional, given, i = [], set(), 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and len(token) > 2:
            name = token[2:].split("=", 1)[0].replace("-", "_")
            known = name in names or (name.startswith("no") and name[2:] in names)
            if not known and not accepts_any:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"did you mean --{close[0]}? " if close else ""
                options = ", ".join(f"--{n}" for n in names) or "none"
                raise ConfigError(f"{command}: unknown flag --{name}: {hint}its flags are {options}")
            given.add(name)
            value_follows = "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            boolean = name in parameters and isinstance(parameters[name].default, bool)
            i += 2 if value_follows and not boolean else 1
        else:
            positional.append(token)
            i += 1
    free = [n for n in names if n not in given]
    if len(positional) > len(free):
        raise ConfigError(f"{command}: unexpected argument '{positional[len(free)]}': pass settings as --FLAG VALUE "
                          f"({', '.join(f'--{n}' for n in names) or 'no flags'})")


@checked
def run(config: str | None = None, **flags) -> None:
    """Run the sweep described by defaults < ``config`` (YAML) < ``flags``; print the results table."""
    from evaluation.executors import run_sweep
    from evaluation.runner import results_table

    settings = resolve_config(config, **flags)
    results = run_sweep(settings)
    print(results_table(results))
    print(f"\nPredictions, metrics and configs are in {settings.output_dir}/ (one folder per run); rerun the same "
          "command to resume.")


def list_presses() -> str:
    """Print every registered press with its knob and one line about it."""
    rows = [f"{name:<26} {spec.knob or '-':<18} {spec.description}" for name, spec in sorted(PRESSES.items())]
    return "\n".join([f"{'press':<26} {'knob':<18} description", *rows])


@checked
def smoke(context_length: int = 512, compression_ratio: float = 0.5, threshold: float = 0.0,
          head_compression_ratio: float = 0.5, seed: int = 0) -> str:
    """Apply every press to a tiny random Qwen3 model (no download) and report achieved compression and time."""
    if not 16 <= context_length <= 4096:
        raise ConfigError(f"smoke: --context_length must be in [16, 4096] tokens, got {context_length}")
    if not 0 <= compression_ratio < 1:
        raise ConfigError(f"smoke: --compression_ratio must be in [0, 1), got {compression_ratio}")
    if seed < 0:
        raise ConfigError(f"smoke: --seed must be 0 or more, got {seed}")
    import tempfile

    import numpy as np
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging as transformers_logging

    from presses import KVzapConfig, KVzapModel
    from presses.generation import GenerationSettings, answer_questions

    transformers_logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    config._attn_implementation = "eager"
    model = Qwen3ForCausalLM(config).eval()
    context = torch.randint(0, 256, (1, context_length))
    question = torch.randint(0, 256, (1, 8))
    rows = [f"{'press':<26} {'setting':<30} {'achieved':>9} {'seconds':>8}"]
    with tempfile.TemporaryDirectory() as surrogate_dir:
        for model_type, hidden in (("linear", None), ("mlp", 8)):
            KVzapModel(KVzapConfig(input_dim=64, output_dim=2, n_modules=2, hidden_dim=hidden)).save_pretrained(
                f"{surrogate_dir}/{model_type}")
        write_random_artifacts(model, surrogate_dir)  # found beside the model, as for a local model folder
        model.name_or_path = surrogate_dir
        for name, spec in sorted(PRESSES.items()):
            if name.startswith("kvzip") or name.endswith("on_the_fly"):
                continue  # need a tokenizer (repeat prompt, calibration texts); covered by the tests
            knob = {"compression_ratio": compression_ratio, "threshold": threshold,
                    "head_compression_ratio": head_compression_ratio}.get(spec.knob)
            kwargs = {spec.knob: knob} if spec.knob else {}
            if "kvzap" in name:
                kwargs["checkpoint"] = f"{surrogate_dir}/{'linear' if name == 'kvzap_linear' else 'mlp'}"
            if name == "lukv":  # a flat LU-KV budget curve: every head at the requested ratio
                curve = torch.arange(1, 100, dtype=torch.float32)[:, None, None] / 100
                np.save(f"{surrogate_dir}/lukv.npy", curve.expand(99, 2, 2).numpy())
                kwargs["budget_curve"] = f"{surrogate_dir}/lukv.npy"
            start = time.perf_counter()
            press = build_press(name, **kwargs)
            setting = f"{spec.knob}={knob}" if spec.knob else "defaults"
            try:
                _, ratio = answer_questions(model, None, context, [question], press,
                                            GenerationSettings(max_new_tokens=8))
            except PressError as error:  # a tokenizer or a question-aware prompt, which this random model lacks
                rows.append(f"{name:<26} {setting:<30} {'skipped':>9} {'-':>8}  ({error})")
                continue
            rows.append(f"{name:<26} {setting:<30} {ratio:>9.3f} {time.perf_counter() - start:>8.2f}")
    return "\n".join(rows)


def write_random_artifacts(model, folder: str) -> None:
    """Random DuoAttention patterns, Q-Filters, Fast KVzip gates and RestoreKV adapters for ``model`` in their
    default folders."""
    import torch

    from presses.duo_attention_press import PATTERNS_FOLDER, DuoPatterns, save_patterns
    from presses.fastkvzip_press import GATES_FOLDER, FastKVzipGate, gate_file_name, save_gates
    from presses.qfilter_press import QFILTERS_FOLDER, save_qfilters
    from presses.restorekv_press import local_folder, random_adapter, save_adapter

    config = model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    save_patterns(f"{folder}/{PATTERNS_FOLDER}", DuoPatterns(4, 16, torch.rand(layers, kv_heads)))
    save_qfilters(f"{folder}/{QFILTERS_FOLDER}", torch.randn(layers, kv_heads, config.head_dim))
    group = config.num_attention_heads // kv_heads
    gates = [FastKVzipGate(config.hidden_size, 16, kv_heads, group, 16) for _ in range(layers)]
    save_gates(f"{folder}/{GATES_FOLDER}/{gate_file_name(model)}", gates)
    for plus in (False, True):
        save_adapter(f"{folder}/{local_folder(plus)}", random_adapter(model), rank=8, alpha=16)


@checked
def export(results: str = "results/runs", out: str = "kvpress_results") -> str:
    """Write every run under --results in kvpress's layout (predictions.csv, metrics.json, config.yaml) to --out."""
    from evaluation.kvpress_format import export_kvpress

    check_writable_folder(out, "--out")

    folders = export_kvpress(results, out)
    return f"exported {len(folders)} run(s) to {out}/ in kvpress's layout"


@checked
def import_(source: str, output_dir: str = "results/runs") -> str:
    """Read kvpress result folders under --source into --output_dir (rescored with kvpress-eval's metrics)."""
    from evaluation.kvpress_format import import_kvpress

    check_writable_folder(output_dir)

    folders = import_kvpress(source, output_dir)
    return "\n".join([f"imported {len(folders)} kvpress run(s):", *(f"  {folder}" for folder in folders)])


@checked
def train_kvzap(output_dir: str, model: str = DEFAULT_MODEL, texts: str = "synthetic", n_texts: int = 200,
                positions_per_text: int = 500, min_text_tokens: int = 750, max_text_tokens: int = 1250,
                hidden_dim: int | None = None, epochs: int = 15, device: str | None = None, dtype: str = "float32",
                seed: int = 0) -> str:
    """Train KVzap linear and MLP surrogates for --model into --output_dir/kvzap-{linear,mlp}.

    --texts: synthetic (built in, offline), nemotron (nvidia/Nemotron-Pretraining-Dataset-sample, online), or a
    local .txt/.jsonl file or folder. Texts outside [--min_text_tokens, --max_text_tokens] are cut or skipped.
    """
    from evaluation.kvzap.train import TrainSettings
    from evaluation.kvzap.train import train_kvzap as train
    from evaluation.models import DTYPES, check_device, check_model, load_model

    if hidden_dim is not None and hidden_dim < 1:
        raise ConfigError(f"train-kvzap: --hidden_dim must be at least 1, got {hidden_dim}")
    if dtype not in DTYPES:
        raise ConfigError(f"train-kvzap: --dtype must be {', '.join(DTYPES)}, got '{dtype}'")
    if seed < 0:
        raise ConfigError(f"train-kvzap: --seed must be 0 or more, got {seed}")
    settings = TrainSettings(texts=str(texts), n_texts=n_texts, positions_per_text=positions_per_text,
                             min_text_tokens=min_text_tokens, max_text_tokens=max_text_tokens, hidden_dim=hidden_dim,
                             epochs=epochs, seed=seed)
    if min(n_texts, positions_per_text, min_text_tokens, epochs) < 1 or max_text_tokens < min_text_tokens:
        raise ConfigError("train-kvzap: --n_texts, --positions_per_text, --min_text_tokens and --epochs must be "
                          "positive and --max_text_tokens at least --min_text_tokens")
    check_writable_folder(output_dir)
    check_model(model)
    check_device(device)
    loaded, tokenizer = load_model(model, device, dtype, "sdpa")
    report = train(loaded, tokenizer, output_dir, settings)
    rows = [f"{'layer':<6} {'linear R2':>10} {'mlp R2':>8} {'linear r':>9} {'mlp r':>7}"]
    for i in range(report["layers"]):
        rows.append(f"{i:<6} {report['linear']['r2'][i]:>10.3f} {report['mlp']['r2'][i]:>8.3f} "
                    f"{report['linear']['pearson'][i]:>9.3f} {report['mlp']['pearson'][i]:>7.3f}")
    rows.append(f"{'mean':<6} {report['linear']['mean_r2']:>10.3f} {report['mlp']['mean_r2']:>8.3f} "
                f"{report['linear']['mean_pearson']:>9.3f} {report['mlp']['mean_pearson']:>7.3f}")
    rows.append(f"\n{report['train_pairs']} training pairs, {report['heldout_pairs']} held out, "
                f"{report['wall_seconds']} s; surrogates in {output_dir}/kvzap-linear and {output_dir}/kvzap-mlp")
    return "\n".join(rows)


def _text_settings(texts: str, n_texts: int, min_text_tokens: int, max_text_tokens: int, seed: int,
                   positions_per_text: int = 500):
    from evaluation.kvzap.train import TrainSettings

    if min(n_texts, min_text_tokens, positions_per_text) < 1 or max_text_tokens < min_text_tokens:
        raise ConfigError("--n_texts, --min_text_tokens and --positions_per_text must be positive and "
                          "--max_text_tokens at least --min_text_tokens")
    return TrainSettings(texts=str(texts), n_texts=n_texts, positions_per_text=positions_per_text,
                         min_text_tokens=min_text_tokens, max_text_tokens=max_text_tokens, seed=seed)


@checked
def build_duo_patterns(output_dir: str, model: str = DEFAULT_MODEL, texts: str = "synthetic", n_texts: int = 50,
                       min_text_tokens: int = 400, max_text_tokens: int = 1000, sink_size: int = 64,
                       recent_size: int = 256, device: str | None = None, dtype: str = "float32", seed: int = 0) -> str:
    """DuoAttention head patterns for --model into --output_dir/duo-attention (kvpress's on-the-fly scorer over
    --texts: synthetic offline, nemotron online, or a local .txt/.jsonl file or folder)."""
    from evaluation.artifacts.duo import build_duo_patterns as build
    from evaluation.models import load_model

    settings = _text_settings(texts, n_texts, min_text_tokens, max_text_tokens, seed)
    if min(sink_size, recent_size) < 0:
        raise ConfigError("--sink_size and --recent_size must be non-negative")
    loaded, tokenizer = load_model(model, device, dtype, "sdpa")
    return f"DuoAttention patterns in {build(loaded, tokenizer, output_dir, settings, sink_size, recent_size)}"


@checked
def build_qfilters(output_dir: str, model: str = DEFAULT_MODEL, texts: str = "synthetic", n_texts: int = 50,
                   min_text_tokens: int = 400, max_text_tokens: int = 1000, device: str | None = None,
                   dtype: str = "float32", seed: int = 0) -> str:
    """Q-Filters for --model into --output_dir/qfilters, from its queries over --texts (as build-duo-patterns)."""
    from evaluation.artifacts.qfilters import build_qfilters as build
    from evaluation.models import load_model

    settings = _text_settings(texts, n_texts, min_text_tokens, max_text_tokens, seed)
    loaded, tokenizer = load_model(model, device, dtype, "sdpa")
    return f"Q-Filters in {build(loaded, tokenizer, output_dir, settings)}"


@checked
def train_fastkvzip(output_dir: str, model: str = DEFAULT_MODEL, texts: str = "synthetic", n_texts: int = 200,
                    positions_per_text: int = 500, min_text_tokens: int = 750, max_text_tokens: int = 1250,
                    steps: int = 2000, device: str | None = None, dtype: str = "float32", seed: int = 0) -> str:
    """Fast KVzip gates for --model into --output_dir/fastkvzip, trained on KVzip scores (train-kvzap's data path)."""
    from evaluation.artifacts.fastkvzip import train_fastkvzip as train
    from evaluation.models import load_model

    settings = _text_settings(texts, n_texts, min_text_tokens, max_text_tokens, seed, positions_per_text)
    if steps < 1:
        raise ConfigError("--steps must be positive")
    loaded, tokenizer = load_model(model, device, dtype, "sdpa")
    report = train(loaded, tokenizer, output_dir, settings, steps)
    rows = [f"{'layer':<6} {'BCE':>7} {'const BCE':>10} {'pearson':>8}"]
    rows += [f"{i:<6} {b:>7.3f} {c:>10.3f} {r:>8.3f}"
             for i, (b, c, r) in enumerate(zip(report["bce"], report["constant_bce"], report["pearson"], strict=True))]
    rows.append(f"\n{report['train_pairs']} training pairs, {report['heldout_pairs']} held out, "
                f"{report['wall_seconds']} s; gates in {output_dir}/fastkvzip")
    return "\n".join(rows)


@checked
def compare(baseline: str | None = None, results: paths = "results/runs", tolerance: float | None = None,
            save: str | None = None) -> None:
    """Compare --results with --baseline (a results folder or a file written by --save); exit 1 on a regression.

    A cell (model, dataset, press, point, task) fails when its score drops by more than --tolerance points
    or when a baseline run is missing from --results. --save FILE writes --results as a baseline file instead.
    --results takes several folders, comma-separated (the shards of a sweep), read as one.
    """
    from evaluation.compare import DEFAULT_TOLERANCE, save_baseline
    from evaluation.compare import compare as compare_results

    if save is not None:
        from pathlib import Path

        check_writable_folder(str(Path(save).expanduser().parent), "--save's folder")
        print(f"saved {save_baseline(results, save)} cells of {','.join(results)} to {save}")
        return
    if baseline is None:
        raise ConfigError("compare needs --baseline (a results folder or baseline file), or --save FILE")
    table, passed = compare_results(baseline, results, DEFAULT_TOLERANCE if tolerance is None else tolerance)
    print(table)
    if not passed:
        print("kvpress-eval compare: regression against the baseline (see DROP / MISSING above)", file=sys.stderr)
        sys.exit(1)


@checked
def leaderboard(results: paths = "results", out: str = "site") -> str:
    """Build the static leaderboard site (accuracy versus compression) from the runs under --results into --out.

    --results takes several folders, comma-separated (the shards of a sweep), read as one."""
    from leaderboard import build_site

    check_writable_folder(out, "--out")

    index = build_site(results, out)
    return f"leaderboard written to {out}/: open {index} in a browser"


COMMANDS = {"presses": list_presses, "smoke": smoke, "export": export, "import": import_,
            "train-kvzap": train_kvzap, "build-duo-patterns": build_duo_patterns, "build-qfilters": build_qfilters,
            "train-fastkvzip": train_fastkvzip, "compare": compare, "leaderboard": leaderboard}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="kvpress-eval: %(message)s")
    for noisy in ("httpx", "huggingface_hub", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    argv = sys.argv[1:]
    try:
        if argv and argv[0] in COMMANDS:
            if "--help" not in argv and "-h" not in argv:
                check_flags(COMMANDS[argv[0]], argv[1:], f"kvpress-eval {argv[0]}")
            fire.Fire(COMMANDS[argv[0]], command=argv[1:], name=f"kvpress-eval {argv[0]}")
        elif "--help" in argv or "-h" in argv:
            print(help_text())
        elif argv and not argv[0].startswith("-"):
            raise ConfigError(f"unknown command '{argv[0]}': commands are {', '.join(COMMANDS)}, or flags only for a "
                              "sweep (kvpress-eval --help)")
        else:
            check_flags(run, argv, "sweep")
            fire.Fire(run, command=argv, name="kvpress-eval")
    except (ConfigError, PressError, CacheError) as error:
        print(f"kvpress-eval: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
