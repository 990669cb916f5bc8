from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from presses import compat
from presses.errors import PressError
from presses.scorer_press import ScorerPress

SURROGATE_TYPES = ("linear", "mlp")


class KVzapConfig(PretrainedConfig):
    """Configuration of a KVzap surrogate, in the layout of the published ``nvidia/KVzap-*`` checkpoints.

    ``input_dim`` = hidden size of the base model, ``output_dim`` = its KV heads, ``n_modules`` = its layers,
    ``hidden_dim`` = MLP width (None for the linear surrogate).
    """

    model_type = "kvzap"

    def __init__(self, input_dim: int = 1, output_dim: int = 1, n_modules: int = 1, hidden_dim: int | None = None,
                 **kwargs) -> None:
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.n_modules = n_modules
        self.hidden_dim = hidden_dim
        super().__init__(**kwargs)


class KVzapModel(PreTrainedModel):
    """One small model per decoder layer mapping attention inputs (…, input_dim) to log KVzip+ scores (…, heads).

    Linear: ``layers.{i}`` = Linear(input_dim, output_dim). MLP: ``layers.{i}`` = Sequential(Linear(input_dim,
    hidden_dim), GELU(), Linear(hidden_dim, output_dim)); tensor names match the published checkpoints.
    """

    config_class = KVzapConfig
    base_model_prefix = "kvzap"

    def __init__(self, config: KVzapConfig) -> None:
        super().__init__(config)
        if config.hidden_dim is None:
            self.layers = nn.ModuleList(nn.Linear(config.input_dim, config.output_dim) for _ in range(config.n_modules))
        else:
            self.layers = nn.ModuleList(
                nn.Sequential(
                    nn.Linear(config.input_dim, config.hidden_dim), nn.GELU(), nn.Linear(config.hidden_dim,
                                                                                          config.output_dim)
                )
                for _ in range(config.n_modules)
            )
        self.post_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, n_modules, input_dim) -> (n, n_modules, output_dim)."""
        return torch.stack([layer(x[:, i]) for i, layer in enumerate(self.layers)], dim=1)


def default_checkpoint(model_name_or_path: str, model_type: str) -> str:
    """Where a model's surrogate lives: ``<model dir>/kvzap-<type>`` if shipped beside a local model, else the
    published hub name ``nvidia/KVzap-<type>-<basename>``."""
    local = Path(model_name_or_path) / f"kvzap-{model_type}"
    if local.is_dir():
        return str(local)
    return f"nvidia/KVzap-{model_type}-{model_name_or_path.rstrip('/').split('/')[-1]}"


def load_surrogate(checkpoint: str, model: nn.Module) -> KVzapModel:
    """Load a surrogate from a local directory or hub name, checked against the model it will score."""
    try:
        surrogate = KVzapModel.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        name = getattr(model, "name_or_path", "") or "this model"
        raise PressError(
            f"no KVzap surrogate found at '{checkpoint}' for {name} ({type(error).__name__}): pass "
            "KVzapPress(checkpoint=<local dir or hub name>) pointing to one in the nvidia/KVzap-* format, "
            "or train one: kvpress-eval train-kvzap --model <model> --output_dir <model dir>"
        ) from None
    config = compat.text_config(model)
    expected = (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads)
    found = (surrogate.config.n_modules, surrogate.config.input_dim, surrogate.config.output_dim)
    if expected != found:
        raise PressError(
            f"KVzap surrogate '{checkpoint}' has (layers, hidden size, kv heads) = {found} but the model has "
            f"{expected}: use the surrogate trained for this model"
        )
    return surrogate


@dataclass
class KVzapPress(ScorerPress):
    """Scores each pair with KVzap's per-layer surrogate of the log KVzip+ importance.

    Jegou et al., "KVzap: Fast, Adaptive and Faithful KV Cache Pruning", arXiv 2601.07891. A linear or 2-layer
    MLP surrogate reads the hidden states entering each attention layer and predicts one score per KV head and
    token. Alone it is a top-k press (``compression_ratio``); wrapped in :class:`DMSPress` it evicts by threshold
    (the published KVzap). ``checkpoint`` is a local directory or hub name; by default the surrogate shipped beside
    a local model (``<model dir>/kvzap-<type>``) or ``nvidia/KVzap-<type>-<model basename>``.
    """

    model_type: str = "mlp"
    checkpoint: str | None = None
    surrogate: KVzapModel | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model_type not in SURROGATE_TYPES:
            raise PressError(f"KVzapPress: model_type must be one of {SURROGATE_TYPES}, got '{self.model_type}'")

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        if self.surrogate is None:
            checkpoint = self.checkpoint or default_checkpoint(model.name_or_path or "", self.model_type)
            self.surrogate = load_surrogate(checkpoint, model)
        parameter = next(model.parameters())
        self.surrogate.to(device=parameter.device, dtype=parameter.dtype).eval()

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        """Scores of the tokens in ``hidden_states``: (batch, kv_heads, q_len)."""
        if self.surrogate is None:
            raise PressError("KVzapPress has no surrogate: use it as `with press(model): ...` so it can load one")
        layer = self.surrogate.layers[module.layer_idx]
        with torch.no_grad():
            return layer(hidden_states.to(next(layer.parameters()).dtype)).transpose(1, 2)

