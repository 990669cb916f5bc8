"""``kvpress-eval train-fastkvzip``: Fast KVzip gates for any model, trained on KVzip scores.

Data: the KVzap trainer's path (:mod:`evaluation.kvzap.train`: texts, repeat prompt, random positions) with plain KVzip
targets (``plus_normalization=False``: max attention of the repeated span, Fast KVzip's target) instead of KVzip+.
Fitting follows Fast KVzip's ``optim.py`` (arXiv 2601.17668): one gate per layer (16 sink bases, width 16), binary
cross-entropy between gate and KVzip score, SGD with momentum 0.9 and lr 0.2, 1% warm-up then lr x0.5 at half and
x0.25 at three quarters of the steps, batches of 1,000 positions. Held-out texts give per-layer BCE and Pearson
correlation. Deviation: the published training adds the bias ``b`` twice in the gate's forward; here (as in kvpress's
gate, which loads the published weights) it is added once, so the saved gates score as trained.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from evaluation.config import ConfigError
from evaluation.kvzap.train import TrainSettings, collect, load_texts
from presses import compat
from presses.fastkvzip_press import GATES_FOLDER, FastKVzipGate, gate_file_name, save_gates


def lr_factor(step: int, steps: int) -> float:
    if step < 0.01 * steps:
        return 0.01 * step
    return 1.0 if step < 0.5 * steps else 0.5 if step < 0.75 * steps else 0.25


def train_gates(x: torch.Tensor, y: torch.Tensor, group: int, steps: int, seed: int, dim: int = 16, sink: int = 16,
                batch_size: int = 1000, lr: float = 0.2) -> list[FastKVzipGate]:
    """Gates from ``x`` (n, layers, hidden) and KVzip scores ``y`` (n, layers, kv_heads) in [0, 1]."""
    torch.manual_seed(seed)
    gates = nn.ModuleList(FastKVzipGate(x.shape[2], dim, y.shape[2], group, sink) for _ in range(x.shape[1]))
    optimizer = torch.optim.SGD(gates.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    position = 0
    for step in range(steps):
        if position + batch_size > len(x) and position > 0:
            order, position = torch.randperm(len(x), generator=generator), 0
        batch = order[position : position + batch_size]
        position += batch_size
        loss = sum(bce(gate(x[batch, i][None])[0], y[batch, i].T) for i, gate in enumerate(gates))
        for group_ in optimizer.param_groups:
            group_["lr"] = lr * lr_factor(step, steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return [gate.eval() for gate in gates]


def bce(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fast KVzip's loss: binary cross-entropy, mean over positions, summed over heads."""
    loss = nn.functional.binary_cross_entropy(prediction.clamp(1e-7, 1 - 1e-7), target, reduction="none")
    return loss.mean(-1).sum()


def train_fastkvzip(model, tokenizer, output_dir: str | Path, settings: TrainSettings, steps: int = 2000) -> dict:
    """Collect KVzip targets, train the gates, save ``<output_dir>/fastkvzip/<file>.pt`` and ``report.json``."""
    started = time.perf_counter()
    texts = load_texts(settings, tokenizer)
    if len(texts) < 2:
        raise ConfigError(f"--texts gave {len(texts)} usable text: training needs at least 2 (one is held out)")
    n_heldout = max(1, round(len(texts) * settings.heldout_fraction))
    x_train, y_train = collect(model, tokenizer, texts[n_heldout:], settings, plus_normalization=False)
    x_test, y_test = collect(model, tokenizer, texts[:n_heldout], settings, plus_normalization=False)
    y_train, y_test = y_train.exp(), y_test.exp()  # collect gives log scores
    config = compat.text_config(model)
    group = config.num_attention_heads // config.num_key_value_heads
    gates = train_gates(x_train, y_train, group, steps, settings.seed)
    report = {"model": str(getattr(model, "name_or_path", "")), "settings": asdict(settings), "steps": steps,
              "train_pairs": len(x_train), "heldout_pairs": len(x_test), "bce": [], "pearson": [],
              "constant_bce": []}
    with torch.no_grad():
        for i, gate in enumerate(gates):
            pred, true = gate(x_test[:, i][None])[0], y_test[:, i].T
            report["bce"].append(float(bce(pred, true)))
            report["constant_bce"].append(float(bce(y_train[:, i].mean(0)[:, None].expand_as(true), true)))
            report["pearson"].append(float(torch.corrcoef(torch.stack([pred.flatten(), true.flatten()]))[0, 1]))
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    folder = Path(output_dir) / GATES_FOLDER
    save_gates(folder / gate_file_name(model), gates)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
