"""``kvpress-eval train-kvzap``: train KVzap surrogates (linear and MLP) for any model, with torch alone.

Recipe of KVzap (Jegou et al., arXiv 2601.07891; reference.md section 4.3): KVzip+ targets of random token positions
of many texts (:mod:`evaluation.kvzap.targets`); per layer, a ridge regression (alpha 1, intercept not penalised,
closed form) and a 2-layer MLP (width hidden_size / 8, GELU; MSE, AdamW lr 5e-3, cosine schedule, 15 epochs,
batch 512, gradient clipping 1.0; targets standardised during training, see :func:`train_mlp`). Held-out texts
(5%, split by text so no text is in both) give per-layer R^2 and Pearson correlations. Both surrogates are saved
in the published ``nvidia/KVzap-*`` layout under ``<output_dir>/kvzap-linear`` and ``<output_dir>/kvzap-mlp``
(where :class:`presses.KVzapPress` looks beside a local model), each with ``heldout.safetensors`` (``y_true``,
``y_pred``: (n, layers, kv_heads)) and ``report.json``.

Texts: ``synthetic`` (built in, offline: RULER-style haystacks from the project's generator, sized for the model's
tokenizer), local ``.txt`` files (one text per blank-line-separated paragraph block) or ``.jsonl`` files (a
``text`` field), a folder of them, or ``nemotron`` (``nvidia/Nemotron-Pretraining-Dataset-sample``, online).
Deviation: the published recipe keeps texts of 750-1250 tokens; here the range is a flag, because small models
are trained on shorter contexts.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from evaluation.config import ConfigError
from evaluation.datasets.ruler_synthetic import OFFLINE_TASKS, generate_task
from evaluation.kvzap.targets import collect_targets
from presses import compat
from presses.kvzap_press import KVzapConfig, KVzapModel

logger = logging.getLogger("kvpress-eval")
NEMOTRON = "nvidia/Nemotron-Pretraining-Dataset-sample"


@dataclass
class TrainSettings:
    """What a surrogate training run depends on (saved in each report)."""

    texts: str = "synthetic"
    n_texts: int = 200
    positions_per_text: int = 500
    min_text_tokens: int = 750
    max_text_tokens: int = 1250
    hidden_dim: int | None = None  # MLP width; None: hidden_size / 8
    epochs: int = 15
    batch_size: int = 512
    learning_rate: float = 5e-3
    ridge_alpha: float = 1.0
    heldout_fraction: float = 0.05
    seed: int = 0


# --------------------------------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------------------------------


def synthetic_texts(tokenizer, n: int, min_tokens: int, max_tokens: int, seed: int) -> list[str]:
    """Haystack texts of the project's RULER generator (needles, variables, word lists) of varied lengths."""
    rng = random.Random(seed)
    tasks = [task for task in OFFLINE_TASKS if task != "cwe"] + ["cwe"] * (max_tokens >= 800)
    texts = []
    while len(texts) < n:
        task = tasks[len(texts) % len(tasks)]
        length = rng.randint(min_tokens, max_tokens)
        try:
            record = generate_task(task, tokenizer, length + 160, 1, seed=rng.randrange(2**31))[0]
        except ValueError:  # this task's smallest prompt does not fit the length: another task will
            tasks.remove(task)
            if not tasks:
                raise ConfigError(f"no synthetic text fits {max_tokens} tokens: raise --max_text_tokens") from None
            continue
        texts.append(record["context"].strip())
    return texts


def file_texts(source: Path) -> list[str]:
    files = sorted(p for p in source.rglob("*") if p.suffix in (".txt", ".jsonl")) if source.is_dir() else [source]
    texts = []
    for file in files:
        if file.suffix == ".jsonl":
            for number, line in enumerate(file.read_text().splitlines(), start=1):
                if line.strip():
                    try:
                        texts.append(str(json.loads(line)["text"]))
                    except (ValueError, KeyError, TypeError):
                        raise ConfigError(f"{file}: line {number} is not a JSON object with a 'text' field") from None
        else:
            texts.extend(block for block in file.read_text().split("\n\n") if block.strip())
    return texts


def hub_texts(n: int) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError("--texts nemotron needs the 'datasets' package: pip install datasets") from None
    texts = []
    try:
        subsets = datasets.get_dataset_config_names(NEMOTRON)
        per_subset = math.ceil(3 * n / len(subsets))  # extra rows: many fall outside the token range
        for subset in subsets:
            rows = datasets.load_dataset(NEMOTRON, subset, split="train", streaming=True)
            texts.extend(row["text"] for _, row in zip(range(per_subset), rows, strict=False))
    except Exception as error:  # offline, missing subset, ...: all mean "not reachable here"
        raise ConfigError(f"could not read {NEMOTRON} ({type(error).__name__}): go online, or pass --texts "
                          "synthetic or a local .txt/.jsonl file") from None
    return texts


def load_texts(settings: TrainSettings, tokenizer) -> list[str]:
    """``n_texts`` texts of ``min_text_tokens``..``max_text_tokens`` tokens (longer ones are cut), in a fixed order."""
    if settings.texts == "synthetic":
        return synthetic_texts(tokenizer, settings.n_texts, settings.min_text_tokens, settings.max_text_tokens,
                               settings.seed)
    if settings.texts == "nemotron":
        raw = hub_texts(settings.n_texts)
    else:
        source = Path(settings.texts).expanduser()
        if not source.exists():
            raise ConfigError(f"--texts '{settings.texts}' does not exist: give synthetic, nemotron, or a .txt/.jsonl "
                              "file or folder")
        raw = file_texts(source)
    texts = []
    for text in raw:
        ids = tokenizer.encode(text.strip(), add_special_tokens=False)
        if len(ids) >= settings.min_text_tokens:
            texts.append(tokenizer.decode(ids[: settings.max_text_tokens]).strip())
        if len(texts) == settings.n_texts:
            break
    if not texts:
        raise ConfigError(f"--texts '{settings.texts}' has no text of at least {settings.min_text_tokens} tokens: "
                          "give longer texts or lower --min_text_tokens")
    return texts


# --------------------------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------------------------


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression with an unpenalised intercept (scikit-learn's ``Ridge``), closed form in float64.

    ``x`` (n, d), ``y`` (n, k) -> weight (k, d), bias (k,).
    """
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, xc.T @ yc).T
    return weight.float(), (y_mean - weight @ x_mean).float()


def train_linear(x: torch.Tensor, y: torch.Tensor, alpha: float) -> KVzapModel:
    model = KVzapModel(KVzapConfig(input_dim=x.shape[2], output_dim=y.shape[2], n_modules=x.shape[1]))
    with torch.no_grad():
        for layer_idx, layer in enumerate(model.layers):
            weight, bias = fit_ridge(x[:, layer_idx], y[:, layer_idx], alpha)
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return model


def train_mlp(x: torch.Tensor, y: torch.Tensor, settings: TrainSettings) -> KVzapModel:
    """All layers' MLPs at once (independent parameters; the loss is the mean of their MSEs).

    Targets are standardised per (layer, head) while training and the scale folded back into each last linear
    layer afterwards, so the saved checkpoint predicts raw log scores. Log KVzip+ scores sit far from 0 (around
    -10 on small models), which an MLP starting near 0 needs many steps to reach; the published recipe has ~2,300
    steps per epoch, small-model runs far fewer.
    """
    hidden_dim = settings.hidden_dim or max(1, x.shape[2] // 8)
    torch.manual_seed(settings.seed)
    model = KVzapModel(KVzapConfig(input_dim=x.shape[2], output_dim=y.shape[2], n_modules=x.shape[1],
                                   hidden_dim=hidden_dim))
    mean, std = y.mean(0), y.std(0).clamp_min(1e-6)  # (layers, heads)
    y = (y - mean) / std
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    steps_per_epoch = math.ceil(len(x) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    for _ in tqdm(range(settings.epochs), desc="kvzap mlp", unit="epoch", leave=False):
        for batch in torch.randperm(len(x), generator=generator).split(settings.batch_size):
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        for layer_idx, layer in enumerate(model.layers):
            last = layer[2]
            last.weight.mul_(std[layer_idx, :, None])
            last.bias.mul_(std[layer_idx]).add_(mean[layer_idx])
    return model.eval()


def fit_report(y_true: torch.Tensor, y_pred: torch.Tensor) -> dict[str, list[float]]:
    """Per-layer R^2 (over all heads' values, as scikit-learn's r2_score with uniform averaging over heads) and
    Pearson correlation (all heads pooled)."""
    r2, pearson = [], []
    for layer_idx in range(y_true.shape[1]):
        true, pred = y_true[:, layer_idx].double(), y_pred[:, layer_idx].double()
        residual = ((true - pred) ** 2).sum(0)
        total = ((true - true.mean(0)) ** 2).sum(0).clamp_min(1e-12)
        r2.append(float((1 - residual / total).mean()))
        pearson.append(float(torch.corrcoef(torch.stack([true.flatten(), pred.flatten()]))[0, 1]))
    return {"r2": r2, "pearson": pearson}


# --------------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------------


def collect(model, tokenizer, texts: list[str], settings: TrainSettings,
            plus_normalization: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (n, layers, hidden_size), log KVzip+ or KVzip targets (n, layers, kv_heads)) of all ``texts``."""
    generator = torch.Generator().manual_seed(settings.seed)
    hidden, targets = [], []
    for text in tqdm(texts, desc="KVzip targets", unit="text", leave=False):
        pairs = collect_targets(model, tokenizer, text, settings.positions_per_text, generator, plus_normalization)
        hidden.append(pairs.hidden)
        targets.append(pairs.targets)
    return torch.cat(hidden), torch.cat(targets)


def train_kvzap(model, tokenizer, output_dir: str | Path, settings: TrainSettings) -> dict:
    """Collect targets, fit both surrogates, save them with held-out predictions and a report; returns the report."""
    started = time.perf_counter()
    texts = load_texts(settings, tokenizer)
    if len(texts) < 2:
        raise ConfigError(f"--texts gave {len(texts)} usable text: training needs at least 2 (one is held out)")
    n_heldout = max(1, round(len(texts) * settings.heldout_fraction))
    logger.info("train-kvzap: %d texts (%d held out), up to %d positions each", len(texts), n_heldout,
                settings.positions_per_text)
    x_train, y_train = collect(model, tokenizer, texts[n_heldout:], settings)
    x_test, y_test = collect(model, tokenizer, texts[:n_heldout], settings)
    collected = time.perf_counter()
    config = compat.text_config(model)
    report = {"model": str(getattr(model, "name_or_path", "")), "settings": asdict(settings),
              "train_pairs": len(x_train), "heldout_pairs": len(x_test), "layers": config.num_hidden_layers,
              "target_mean": float(y_train.mean()), "target_std": float(y_train.std()),
              "collect_seconds": round(collected - started, 1)}
    for name, fit in (("linear", lambda: train_linear(x_train, y_train, settings.ridge_alpha)),
                      ("mlp", lambda: train_mlp(x_train, y_train, settings))):
        fitted_at = time.perf_counter()
        surrogate = fit()
        with torch.no_grad():
            y_pred = surrogate(x_test)
        folder = Path(output_dir) / f"kvzap-{name}"
        surrogate.save_pretrained(str(folder))
        save_file({"y_true": y_test.contiguous(), "y_pred": y_pred.contiguous()}, str(folder / "heldout.safetensors"))
        fit = fit_report(y_test, y_pred)
        report[name] = {**fit, "mean_r2": sum(fit["r2"]) / len(fit["r2"]),
                        "mean_pearson": sum(fit["pearson"]) / len(fit["pearson"]),
                        "fit_seconds": round(time.perf_counter() - fitted_at, 1)}
    constant = fit_report(y_test, y_train.mean(0, keepdim=True).expand_as(y_test))
    report["constant_mean_r2"] = sum(constant["r2"]) / len(constant["r2"])
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    for name in ("linear", "mlp"):
        (Path(output_dir) / f"kvzap-{name}" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
