"""Q-Filters: score keys by their projection on the principal direction of the queries.

Godey et al., "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression", arXiv 2503.02812. One filter
per (layer, KV head), (layers, kv_heads, head_dim), in the published layout of ``nthngdy/<model>_qfilt``
(huggingface_hub's ``PyTorchModelHubMixin``: ``config.json`` with ``num_layers``, ``num_kv_heads``, ``kv_head_dim``,
and ``model.safetensors`` holding the parameter ``q_filters``). As in kvpress a key scores ``-(filter . key)``.

Sign: the paper's filter ``v+`` is the queries' first right singular vector oriented so that they project positively
on it, and a key with a higher ``key . v+`` receives more attention on average (its Theorem: ``E[q . k] ~ kappa *
(k . v+)``, ``kappa > 0``). kvpress, whose QFilterPress the paper's first author wrote, keeps the highest
``-(filter . key)``, so a filter in this layout is ``-v+``; ``kvpress-eval build-qfilters`` writes it so, and a test
checks on kvtiny that the shipped filter's score rises with the attention keys receive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from presses import compat
from presses.errors import PressError
from presses.scorer_press import ScorerPress

QFILTERS_FOLDER = "qfilters"  # beside a local model
BUILD_COMMAND = "kvpress-eval build-qfilters --model <model> --output_dir <model dir>"


def save_qfilters(folder: str | Path, q_filters: torch.Tensor) -> Path:
    """Write (layers, kv_heads, head_dim) filters in the published layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers, heads, dim = q_filters.shape
    (folder / "config.json").write_text(json.dumps(
        {"num_layers": layers, "num_kv_heads": heads, "kv_head_dim": dim}, indent=2) + "\n")
    save_file({"q_filters": q_filters.float().contiguous()}, str(folder / "model.safetensors"))
    return folder


def published_name(model_name_or_path: str) -> str:
    """The hub repository kvpress reads a model's filters from: ``nthngdy/<basename>_qfilt`` (Meta-Llama -> Llama)."""
    name = model_name_or_path.rstrip("/").split("/")[-1]
    if "Meta-Llama-3.1-405B" not in name:
        name = name.replace("Meta-Llama", "Llama")
    return f"nthngdy/{name}_qfilt"


def default_qfilters(model_name_or_path: str) -> str:
    """``<model dir>/qfilters`` beside a local model, else the published hub name."""
    local = Path(model_name_or_path) / QFILTERS_FOLDER
    return str(local) if local.is_dir() else published_name(model_name_or_path)


def load_qfilters(source: str, model: nn.Module) -> torch.Tensor:
    """Filters (layers, kv_heads, head_dim) from a local folder or hub name, checked against ``model``."""
    try:
        folder = Path(source)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, allow_patterns=["config.json", "model.safetensors"]))
        q_filters = load_file(str(folder / "model.safetensors"))["q_filters"]
    except Exception as error:  # missing folder, offline hub, unknown repo, bad file: one answer
        raise PressError(f"no Q-Filters at '{source}' ({type(error).__name__}): pass QFilterPress(q_filters_path="
                         f"<local dir or hub name>) in the nthngdy/*_qfilt layout, or build them: {BUILD_COMMAND}"
                         ) from None
    config = compat.text_config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    expected = (config.num_hidden_layers, config.num_key_value_heads, head_dim)
    if tuple(q_filters.shape) != expected:
        raise PressError(f"Q-Filters '{source}' are {tuple(q_filters.shape)} (layers, kv heads, head dim) but the "
                         f"model has {expected}: use the filters built for this model")
    return q_filters


@dataclass
class QFilterPress(ScorerPress):
    """Keys score ``-(q_filter . key)`` (keys with RoPE); the ``compression_ratio`` lowest go.

    Q-Filters (Godey et al., arXiv 2503.02812). ``q_filters_path``: a local folder or hub name in the published
    layout; by default ``<model dir>/qfilters`` beside a local model, else ``nthngdy/<model basename>_qfilt``.
    """

    q_filters_path: str | None = None
    q_filters: torch.Tensor | None = field(default=None, repr=False)

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        if self.q_filters is None:
            self.q_filters = load_qfilters(self.q_filters_path or default_qfilters(model.name_or_path or ""), model)

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        if self.q_filters is None:
            raise PressError("QFilterPress has no filters: use it as `with press(model): ...` so it can load them")
        q_filter = self.q_filters[module.layer_idx].to(device=keys.device, dtype=torch.float32)
        return -torch.einsum("bhnd,hd->bhn", keys.float(), q_filter)
