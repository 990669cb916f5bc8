"""Fast KVzip: small gates trained on KVzip scores predict each pair's importance from the prefill alone.

Kim, Han and Yun, "Fast KVzip: Efficient and Accurate LLM Inference with Gated KV Eviction", arXiv 2601.17668.
Gates are stored as published in ``Jang-Hyun/Fast-KVzip``: ``<model basename, lowercase>/q<group>_dim<d>_sink<s>.pt``,
a ``torch.save`` of ``{"module": [state dict of layer 0, layer 1, ...]}``; the sink count is read from the file name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from presses import compat
from presses.base_press import BasePress, LayerInputs, validate_ratio
from presses.errors import PressError

PUBLISHED_REPO = "Jang-Hyun/Fast-KVzip"
GATES_FOLDER = "fastkvzip"  # beside a local model: the model's folder of the published repository
BUILD_COMMAND = "kvpress-eval train-fastkvzip --model <model> --output_dir <model dir>"


class RMSNorm(nn.Module):
    """Qwen3's RMS norm (weight only, eps 1e-6), the gates' ``q_norm`` / ``k_norm``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


class FastKVzipGate(nn.Module):
    """One layer's gate: (batch, n, input_dim) hidden states -> (batch, kv_heads, n) scores in (0, 1).

    Per KV head, ``group`` queries and one key of width ``dim`` are projected from the token's own hidden state; the
    score is ``exp(k.q/sqrt(d) + b) / (exp(k.q/sqrt(d) + b) + sum_s exp(k_base_s.q/sqrt(d)))`` averaged over the
    group. Parameter names and shapes are the published ones (``q_proj`` with bias, ``k_proj``, ``q_norm``,
    ``k_norm``, ``k_base`` (heads, 1, sink, dim), ``b`` (heads, 1, group)).
    """

    def __init__(self, input_dim: int, dim: int, heads: int, group: int, sink: int) -> None:
        super().__init__()
        self.dim, self.heads, self.group, self.sink = dim, heads, group, sink
        self.q_proj = nn.Linear(input_dim, heads * group * dim, bias=True)
        self.k_proj = nn.Linear(input_dim, heads * dim, bias=False)
        self.q_norm = RMSNorm(dim)
        self.k_norm = RMSNorm(dim)
        self.k_base = nn.Parameter(torch.zeros(heads, 1, sink, dim))
        self.b = nn.Parameter(torch.zeros(heads, 1, group))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, n, _ = hidden_states.shape
        queries = self.q_norm(self.q_proj(hidden_states).view(batch, n, self.heads, self.group, self.dim))
        keys = self.k_norm(self.k_proj(hidden_states).view(batch, n, self.heads, self.dim))
        scale = math.sqrt(self.dim)
        logit = torch.einsum("bnhd,bnhgd->bhng", keys, queries) / scale + self.b[None]  # (b, heads, n, group)
        base = torch.einsum("hsd,bnhgd->bhnsg", self.k_base[:, 0], queries) / scale  # (b, heads, n, sink, group)
        score = 1 / (1 + torch.exp(base - logit[:, :, :, None]).sum(3))
        return score.mean(-1)


def gate_file_name(model: nn.Module, dim: int = 16, sink: int = 16) -> str:
    """The published default file of a model: ``q<query heads per KV head>_dim16_sink16.pt``."""
    config = compat.text_config(model)
    return f"q{config.num_attention_heads // config.num_key_value_heads}_dim{dim}_sink{sink}.pt"


def save_gates(path: str | Path, gates: list[FastKVzipGate], extra: dict | None = None) -> Path:
    """``torch.save({"module": [state dicts]})`` (the file name should carry ``sink<s>``, as published)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": [{k: v.detach().cpu() for k, v in g.state_dict().items()} for g in gates], **(extra or {})},
               path)
    return path


def gates_from_state_dicts(state_dicts: list[dict], sink: int) -> list[FastKVzipGate]:
    """Rebuild gates from published state dicts; shapes give the widths, the file name gives ``sink``."""
    gates = []
    for weights in state_dicts:
        heads_group_dim, input_dim = weights["q_proj.weight"].shape
        heads_dim = weights["k_proj.weight"].shape[0]
        dim = weights["q_norm.weight"].shape[-1]
        gate = FastKVzipGate(input_dim, dim, heads_dim // dim, heads_group_dim // heads_dim, sink)
        gate.load_state_dict({k: v.float() for k, v in weights.items()})
        gates.append(gate.eval())
    return gates


def _load_published(path: Path) -> list[dict]:
    """The ``module`` list of a published file; safe loading, allowing the numpy training curves stored beside it."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    allowed = [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
               type(np.dtype(np.float64)), type(np.dtype(np.float32))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)["module"]


def default_gates(model_name_or_path: str) -> str:
    """``<model dir>/fastkvzip`` beside a local model, else the model's name (gates of ``Jang-Hyun/Fast-KVzip``)."""
    local = Path(model_name_or_path) / GATES_FOLDER
    return str(local) if local.is_dir() else model_name_or_path


def load_gates(source: str, model: nn.Module) -> list[FastKVzipGate]:
    """Gates from a ``.pt`` file, a local folder holding the model's default file, or a model name (the hub)."""
    name = gate_file_name(model)
    try:
        path = Path(source)
        if path.is_dir():
            path = path / name
        elif not path.is_file():
            from huggingface_hub import hf_hub_download

            hub_file = f"{source.rstrip('/').split('/')[-1].lower()}/{name}"
            path = Path(hf_hub_download(repo_id=PUBLISHED_REPO, filename=hub_file, repo_type="model"))
        state_dicts = _load_published(path)
        sink = re.search(r"sink(\d+)", path.name)
        gates = gates_from_state_dicts(state_dicts, int(sink.group(1)) if sink else 0)
    except Exception as error:  # missing file, offline hub, bad pickle: one answer
        raise PressError(f"no Fast KVzip gates at '{source}' ({type(error).__name__}): pass FastKVzipPress(gates_path="
                         f"<.pt file, folder or model name>) in the {PUBLISHED_REPO} layout, or train them: "
                         f"{BUILD_COMMAND}") from None
    config = compat.text_config(model)
    expected = (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads)
    found = (len(gates), gates[0].q_proj.in_features, gates[0].heads)
    if expected != found:
        raise PressError(f"Fast KVzip gates '{source}' have (layers, hidden size, kv heads) = {found} but the model "
                         f"has {expected}: use the gates trained for this model")
    return gates


@dataclass
class FastKVzipPress(BasePress):
    """Evict the ``compression_ratio`` lowest gate scores over all layers and heads at once (per layer with
    ``layerwise``), after the prefill.

    Fast KVzip (Kim et al., arXiv 2601.17668), as kvpress runs it: the first ``n_sink`` positions and the last
    ``int(window_ratio * n)`` (``window_size`` from 32,000 tokens) score 1, the gates' maximum. ``gates_path``: a
    ``.pt`` file, a folder or a model name; by default ``<model dir>/fastkvzip`` beside a local model, else the
    model's gates in ``Jang-Hyun/Fast-KVzip``. Deviations: every head keeps at least one pair (kvpress has no
    safeguard), and missing gates are an error naming the training command (older kvpress used random gates).
    """

    compression_ratio: float = 0.0
    layerwise: bool = False
    n_sink: int = 4
    window_size: int = 4096
    window_ratio: float = 0.02
    gates_path: str | None = None
    gates: list[FastKVzipGate] | None = field(default=None, repr=False)
    knob: ClassVar[str | None] = "compression_ratio"

    def __post_init__(self) -> None:
        validate_ratio(self.compression_ratio, type(self).__name__)

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        if self.gates is None:
            self.gates = load_gates(self.gates_path or default_gates(model.name_or_path or ""), model)
        parameter = next(model.parameters())
        self.gates = [gate.to(parameter.device) for gate in self.gates]
        self._layers = sorted(module.layer_idx for module in compat.attention_modules(model))

    def gate_scores(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, kv_heads, n) float32 scores of a prefill, sinks and the local window set to 1."""
        gate = self.gates[layer_idx]
        scores = gate(hidden_states.to(gate.q_proj.weight.dtype)).float()
        n = scores.shape[-1]
        scores[..., : self.n_sink] = 1.0
        window = int(n * self.window_ratio) if n < 32000 else self.window_size
        if window > 0:
            scores[..., -window:] = 1.0
        return scores

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.compression_ratio == 0:
            return layer.evicted
        if self.gates is None:
            raise PressError("FastKVzipPress has no gates: use it as `with press(model): ...` so it can load them")
        idx = layer.module.layer_idx
        with torch.no_grad():
            self.layer_state(idx)["gate_scores"] = self.gate_scores(idx, layer.hidden_states)
        if idx != self._layers[-1]:
            return layer.evicted  # decided once every layer is scored (the prefill is dense, as in kvpress)
        scores = torch.stack([self.layer_state(i).pop("gate_scores") for i in self._layers])  # (L, b, h, n)
        evicted = torch.zeros_like(scores, dtype=torch.bool)
        groups = [(slice(i, i + 1),) for i in range(len(self._layers))] if self.layerwise else [(slice(None),)]
        for group in groups:
            flat = scores[group].flatten()
            n_removed = int(flat.numel() * self.compression_ratio)
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[flat.topk(n_removed, largest=False).indices] = True
            evicted[group] = mask.view_as(scores[group])
        emptied = evicted.all(dim=-1, keepdim=True)  # a head that lost every pair keeps its best one
        evicted &= ~(emptied & torch.zeros_like(evicted).scatter_(-1, scores.argmax(-1, keepdim=True), True))
        for i, layer_idx in enumerate(self._layers[:-1]):
            self.layer_state(layer_idx)["evicted"] = evicted[i].to(layer.evicted.device)
        return evicted[-1].to(layer.evicted.device)
