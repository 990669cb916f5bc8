"""DuoAttention: retrieval heads keep the whole context, streaming heads keep attention sinks and a recent window.

Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads", ICLR 2025
(arXiv 2410.10819). Head patterns are per (layer, KV head) scores; the ``head_compression_ratio`` lowest-scoring
heads become streaming heads. Patterns come in DuoAttention's published layout (a folder holding ``config.json`` with
``sink_size`` and ``recent_size``, and ``full_attention_heads.tsv``: one row per layer, one tab-separated column per
KV head), from a local folder or, for the models DuoAttention published, from its GitHub repository (as kvpress).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from presses import compat
from presses.base_press import BasePress, LayerInputs, presses_paused
from presses.errors import PressError

PATTERNS_FILE = "full_attention_heads.tsv"
PATTERNS_FOLDER = "duo-attention"  # beside a local model
PUBLISHED_URL = "https://raw.githubusercontent.com/mit-han-lab/duo-attention/refs/heads/main/attn_patterns"
# Model name -> run folder of the published patterns (kvpress's table).
PUBLISHED = {
    "togethercomputer/Llama-2-7B-32K-Instruct":
        "Llama-2-7B-32K-Instruct/lr%3D0.02-reg%3D0.05-ctx%3D1000_32000-multi_passkey10",
    "gradientai//Llama-3-8B-Instruct-Gradient-1048k":
        "Llama-3-8B-Instruct-Gradient-1048k/lr%3D0.02-reg%3D0.05-ctx%3D1000_32000-multi_passkey10",
    "gradientai//Llama-3-8B-Instruct-Gradient-4194k":
        "Llama-3-8B-Instruct-Gradient-4194k/lr%3D0.02-reg%3D0.05-ctx%3D1000_32000-multi_passkey10",
    "meta-llama/Meta-Llama-3.1-8B-Instruct":
        "Meta-Llama-3.1-8B-Instruct/lr=0.02-reg=0.05-ctx=1000_128000-multi_passkey10",
    "mistralai/Mistral-7B-Instruct-v0.2":
        "Mistral-7B-Instruct-v0.2/lr%3D0.02-reg%3D0.05-ctx%3D1000_32000-multi_passkey10",
    "mistralai/Mistral-7B-Instruct-v0.3":
        "Mistral-7B-Instruct-v0.3/lr%3D0.02-reg%3D0.05-ctx%3D1000_32000-multi_passkey10",
}
ON_THE_FLY_SINK, ON_THE_FLY_RECENT = 128, 256  # kvpress's window for on-the-fly scores
BUILD_COMMAND = "kvpress-eval build-duo-patterns --model <model> --output_dir <model dir>"


@dataclass(frozen=True)
class DuoPatterns:
    """``head_scores`` (layers, kv_heads) float32 in [0, 1] (higher: more of a retrieval head), and the window."""

    sink_size: int
    recent_size: int
    head_scores: torch.Tensor


def save_patterns(folder: str | Path, patterns: DuoPatterns, extra_config: dict | None = None) -> Path:
    """Write ``config.json`` and ``full_attention_heads.tsv`` in DuoAttention's published layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**(extra_config or {}), "sink_size": patterns.sink_size, "recent_size": patterns.recent_size}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    rows = ["\t".join(f"{float(x):.6f}" for x in row) for row in patterns.head_scores]
    (folder / PATTERNS_FILE).write_text("\n".join(rows) + "\n")
    return folder


def parse_patterns(config_text: str, tsv_text: str, n_layers: int) -> DuoPatterns:
    """Published texts -> patterns; scores are clipped to [0, 1] as DuoAttention's loader does."""
    config = json.loads(config_text)
    rows = [[float(x) for x in line.split("\t")] for line in tsv_text.strip().splitlines() if line.strip()]
    scores = torch.tensor(rows, dtype=torch.float32).reshape(n_layers, -1).clamp(0, 1)
    return DuoPatterns(int(config["sink_size"]), int(config["recent_size"]), scores)


def default_patterns(model_name_or_path: str) -> str:
    """``<model dir>/duo-attention`` beside a local model, else the model's name (published patterns)."""
    local = Path(model_name_or_path) / PATTERNS_FOLDER
    return str(local) if local.is_dir() else model_name_or_path


def load_patterns(source: str, model: nn.Module) -> DuoPatterns:
    """Patterns from a local folder or a model name DuoAttention published, checked against ``model``."""
    config = compat.text_config(model)
    expected = (config.num_hidden_layers, config.num_key_value_heads)
    folder = Path(source)
    try:
        if folder.is_dir():
            texts = (folder / "config.json").read_text(), (folder / PATTERNS_FILE).read_text()
        elif source in PUBLISHED:
            url = f"{PUBLISHED_URL}/{PUBLISHED[source]}/"
            texts = tuple(urllib.request.urlopen(url + name, timeout=30).read().decode()  # noqa: S310
                          for name in ("config.json", PATTERNS_FILE))
        else:
            raise FileNotFoundError(source)
        patterns = parse_patterns(*texts, n_layers=expected[0])
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise PressError(f"no DuoAttention patterns at '{source}' ({type(error).__name__}): pass "
                         f"DuoAttentionPress(patterns=<folder>) in DuoAttention's layout, or build them: "
                         f"{BUILD_COMMAND}") from None
    if tuple(patterns.head_scores.shape) != expected:
        raise PressError(f"DuoAttention patterns '{source}' are {tuple(patterns.head_scores.shape)} (layers, kv heads) "
                         f"but the model has {expected}: use the patterns built for this model")
    return patterns


def _keys_before_rope(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """(batch, kv_heads, n, head_dim) keys of ``hidden_states`` before RoPE (after Qwen3/Gemma3's ``k_norm``)."""
    batch, n, _ = hidden_states.shape
    keys = module.k_proj(hidden_states).view(batch, n, -1, compat.head_dim(module))
    if hasattr(module, "k_norm"):
        keys = module.k_norm(keys)
    return keys.transpose(1, 2)


@torch.no_grad()
def on_the_fly_head_scores(model: nn.Module, contexts: list[torch.Tensor], q_len: int = 500) -> torch.Tensor:
    """kvpress's on-the-fly DuoAttention scores, (layers, kv_heads) float32, from token id tensors (1, n).

    For each context and layer: the mean query and mean key (before RoPE) are repeated ``q_len`` times and rotated
    to positions 0..q_len-1; the score of a head is the mean over positions of the cumulated attention of the last
    query (the area under its cumulated attention curve), averaged over the query heads of a KV group and over the
    contexts. Heads whose attention stays local score low and become streaming heads first.
    """
    modules = compat.attention_modules(model)
    base = model.model if hasattr(model, "model") else model
    base = getattr(base, "language_model", base)
    device = next(model.parameters()).device
    config = compat.text_config(model)
    scores = torch.zeros(config.num_hidden_layers, config.num_key_value_heads)
    inputs: dict[int, torch.Tensor] = {}

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs[module.layer_idx] = compat.hidden_states_from(args, kwargs)

    handles = [module.register_forward_pre_hook(capture, with_kwargs=True) for module in modules]
    try:
        for ids in contexts:
            inputs.clear()
            model(input_ids=ids.to(device), use_cache=False)
            for module in modules:
                hidden = inputs[module.layer_idx]
                query = compat.query_states(module, hidden, None).float().mean(2, keepdim=True)
                key = _keys_before_rope(module, hidden).float().mean(2, keepdim=True)
                positions = torch.arange(q_len, device=device)[None]
                cos, sin = base.rotary_emb(hidden.float(), positions)
                rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
                query, key = rope(query.expand(-1, -1, q_len, -1), key.expand(-1, -1, q_len, -1), cos, sin)
                key = key.repeat_interleave(compat.num_key_value_groups(module), dim=1)
                weights = (query[:, :, -1:] @ key.transpose(2, 3) / query.shape[-1] ** 0.5).softmax(-1)[0, :, 0]
                head = weights.cumsum(-1).mean(-1).view(-1, compat.num_key_value_groups(module)).mean(-1)
                scores[module.layer_idx] += head.cpu() / len(contexts)
    finally:
        for handle in handles:
            handle.remove()
    return scores


@dataclass
class DuoAttentionPress(BasePress):
    """Streaming heads keep ``sink_size`` first and ``recent_size`` last positions of the context; the rest keep all.

    DuoAttention (Xiao et al., arXiv 2410.10819). The ``head_compression_ratio`` fraction of (layer, KV head) pairs
    with the lowest pattern scores are streaming heads (``round(n_heads * ratio)``, as kvpress). Patterns: ``patterns``
    (a local folder in DuoAttention's layout or a published model name), by default ``<model dir>/duo-attention``
    or the model's published patterns. With ``on_the_fly_scoring`` (kvpress's experimental variant) scores come from
    :func:`on_the_fly_head_scores` over ``calibration_texts`` texts instead, with sink 128 and window 256. kvpress
    computes those over 50 BookSum chapters (online); here over the project's synthetic texts (offline).
    The achieved compression is ``streaming fraction * (1 - (sink + recent) / k_len)``.
    """

    head_compression_ratio: float = 0.0
    on_the_fly_scoring: bool = False
    patterns: str | None = None
    calibration_texts: int = 50
    knob: ClassVar[str | None] = "head_compression_ratio"
    sink_size: int | None = field(init=False, default=None)
    recent_size: int | None = field(init=False, default=None)
    streaming_mask: torch.Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        ratio = self.head_compression_ratio
        if not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise PressError(f"DuoAttentionPress: head_compression_ratio must be in [0, 1] (fraction of heads made "
                             f"streaming heads), got {ratio!r}")

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        if self.on_the_fly_scoring:
            scores = _cached_on_the_fly(model, tokenizer, self.calibration_texts)
            patterns = DuoPatterns(ON_THE_FLY_SINK, ON_THE_FLY_RECENT, scores)
        else:
            patterns = load_patterns(self.patterns or default_patterns(model.name_or_path or ""), model)
        self.sink_size, self.recent_size = patterns.sink_size, patterns.recent_size
        self.streaming_mask = streaming_heads(patterns.head_scores, self.head_compression_ratio)

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill:
            return layer.evicted
        if self.streaming_mask is None:
            raise PressError("DuoAttentionPress has no patterns: use it as `with press(model): ...` to load them")
        stop = layer.k_len - self.recent_size
        if stop <= self.sink_size:
            return layer.evicted
        evicted = layer.evicted.clone()
        heads = self.streaming_mask[layer.module.layer_idx].to(evicted.device)
        evicted[:, heads, self.sink_size : stop] = True
        return evicted


def streaming_heads(head_scores: torch.Tensor, head_compression_ratio: float) -> torch.Tensor:
    """(layers, kv_heads) bool: the ``round(n * ratio)`` lowest scores (ties: first heads first)."""
    n_streaming = round(head_scores.numel() * head_compression_ratio)
    mask = torch.zeros(head_scores.numel(), dtype=torch.bool)
    mask[torch.argsort(head_scores.flatten(), stable=True)[:n_streaming]] = True
    return mask.view(head_scores.shape)


def calibration_contexts(model: nn.Module, tokenizer, n_texts: int, seed: int = 0) -> list[torch.Tensor]:
    """Token ids of ``n_texts`` offline synthetic texts (the KVzap trainer's), 400-1000 tokens, for calibration."""
    from evaluation.kvzap.train import synthetic_texts  # the project's offline text source

    if tokenizer is None:
        raise PressError("duo_attention_on_the_fly needs the model's tokenizer: call press(model, tokenizer)")
    texts = synthetic_texts(tokenizer, n_texts, 400, 1000, seed)
    return [torch.tensor([tokenizer.encode(text, add_special_tokens=False)]) for text in texts]


_ON_THE_FLY: dict[tuple, torch.Tensor] = {}


def _cached_on_the_fly(model: nn.Module, tokenizer, n_texts: int) -> torch.Tensor:
    """On-the-fly scores, computed once per (model, texts) in a process as kvpress caches them."""
    key = (model.name_or_path, id(model), n_texts)
    if key not in _ON_THE_FLY:
        _ON_THE_FLY.clear()
        with presses_paused():  # presses already attached (the sweep engine's) must not see the calibration
            _ON_THE_FLY[key] = on_the_fly_head_scores(model, calibration_contexts(model, tokenizer, n_texts))
    return _ON_THE_FLY[key]
