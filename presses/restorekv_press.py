"""RestoreKV: KVzip eviction plus a few learned restore tokens that summarise the full cache before it is cut.

"RestoreKV: Budget-Matched Learned Restoration for Query-Agnostic KV Cache Eviction", arXiv 2608.01247, as kvpress's
``RestoreKVPress``. Adapters as published in ``higokri/RestoreKV-<model>[_plus]`` (PEFT LoRA layout):

    adapter_config.json              {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors        <module>.lora_A.weight (r, in), <module>.lora_B.weight (out, r)
    restore_embeddings.safetensors   "restore_embeddings" (n_tokens, hidden_size)

The LoRA is applied here by forward hooks on the target projections for the one restore pass, from safetensors,
without peft: peft would wrap every target projection of the shared model for the whole run (every press of a
sweep and every forward then goes through its disabled adapter layers), while the adapter is needed for one
forward per context. Plain LoRA (optionally rsLoRA) is all the published adapters use; anything else is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from presses import compat
from presses.errors import PressError
from presses.kvzip_press import KVzipPress

PUBLISHED_PREFIX = "higokri/RestoreKV-"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "restore_embeddings.safetensors")


@dataclass(frozen=True)
class RestoreAdapter:
    """A loaded RestoreKV checkpoint: restore-token embeddings (n, hidden) and LoRA factors per module name.

    ``lora`` maps a module name of the causal LM (``model.layers.0.self_attn.q_proj``) to (A (r, in), B (out, r));
    the update of that module's output is ``scale * x A^T B^T``.
    """

    embeddings: torch.Tensor
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float


def local_folder(plus: bool) -> str:
    """The folder beside a local model where its adapter is looked for first."""
    return "restorekv_plus" if plus else "restorekv"


def default_adapter(model_name_or_path: str, plus: bool) -> str:
    """``<model dir>/restorekv[_plus]`` beside a local model, else ``higokri/RestoreKV-<model basename>[_plus]``."""
    local = Path(model_name_or_path) / local_folder(plus)
    if local.is_dir():
        return str(local)
    return f"{PUBLISHED_PREFIX}{model_name_or_path.rstrip('/').split('/')[-1]}{'_plus' if plus else ''}"


def _adapter_folder(source: str) -> Path:
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=list(ADAPTER_FILES)))


def load_adapter(source: str) -> RestoreAdapter:
    """A RestoreKV checkpoint from a local folder or a hub name, in the published layout (module docstring)."""
    from safetensors.torch import load_file

    try:
        folder = _adapter_folder(source)
        config = json.loads((folder / ADAPTER_FILES[0]).read_text())
        weights = load_file(str(folder / ADAPTER_FILES[1]))
        embeddings = load_file(str(folder / ADAPTER_FILES[2]))["restore_embeddings"]
    except Exception as error:  # missing folder or file, offline hub, unknown repository, bad file: one answer
        raise PressError(f"no RestoreKV adapter at '{source}' ({type(error).__name__}): pass adapter=<folder or hub "
                         f"name> holding {', '.join(ADAPTER_FILES)}, or download it beforehand: "
                         f"huggingface-cli download {source}") from None
    unsupported = [key for key in ("use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern",
                                   "layers_to_transform") if config.get(key)]
    if config.get("peft_type", "LORA") != "LORA" or config.get("bias", "none") != "none" or unsupported:
        raise PressError(f"RestoreKV adapter '{source}' is not a plain LoRA (peft_type {config.get('peft_type')}, "
                         f"bias {config.get('bias')}, {', '.join(unsupported) or 'no other options'}): use a "
                         f"checkpoint in the {PUBLISHED_PREFIX}<model> layout")
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, tensor in weights.items():
        # PEFT saves "base_model.model.<module>.lora_A.weight"; an in-memory adapter name may follow lora_A.
        name = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            if f".{part}." in name:
                module = name.split(f".{part}.")[0]
                pair = lora.setdefault(module, [None, None])
                pair[part == "lora_B"] = tensor
    if not lora or any(a is None or b is None for a, b in lora.values()):
        raise PressError(f"RestoreKV adapter '{source}' has no complete lora_A / lora_B pairs: use a checkpoint in "
                         f"the {PUBLISHED_PREFIX}<model> layout")
    return RestoreAdapter(embeddings, {name: (a, b) for name, (a, b) in lora.items()}, scale)


def save_adapter(folder: str | Path, adapter: RestoreAdapter, rank: int, alpha: int) -> Path:
    """Write ``adapter`` in the published PEFT layout (module names of the causal LM, as PEFT saves them)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    targets = sorted({name.split(".")[-1] for name in adapter.lora})
    (folder / ADAPTER_FILES[0]).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": targets, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "modules_to_save": None}, indent=1))
    tensors = {}
    for name, (a, b) in adapter.lora.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / ADAPTER_FILES[1]))
    save_file({"restore_embeddings": adapter.embeddings.contiguous()}, str(folder / ADAPTER_FILES[2]))
    return folder


def random_adapter(model: nn.Module, rank: int = 8, n_tokens: int = 8,
                   targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj")) -> RestoreAdapter:
    """A random adapter shaped like the published ones, for tests and smoke runs (uses torch's global generator)."""
    lora = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            lora[name] = (torch.randn(rank, module.in_features) / math.sqrt(module.in_features),
                          torch.randn(module.out_features, rank) / math.sqrt(rank))
    hidden = compat.text_config(model).hidden_size
    return RestoreAdapter(torch.randn(n_tokens, hidden) * 0.02, lora, 2.0)


@dataclass
class RestoreKVPress(KVzipPress):
    """KVzip(+) eviction with the budget shared by ``n`` learned restore tokens (RestoreKV, arXiv 2608.01247).

    After KVzip has scored the context (T tokens), the n restore-token embeddings run through the model once, with
    the LoRA adapter on, on top of the full cache: their keys and values are appended (cache T + n) and never
    evicted. KVzip then evicts ``int(pairs * min(1, ratio + n / T))`` context pairs, so the kept pairs, restore
    tokens included, are those of plain KVzip at ``ratio`` (budget-matched, as kvpress); the achieved ratio is
    reported the same way, restore pairs counted as kept out of the context's. The question starts after the
    restore tokens. ``adapter``: a folder or hub name in the published layout; by default
    ``<model dir>/restorekv[_plus]`` beside a local model, else ``higokri/RestoreKV-<model name>[_plus]`` (kvpress's
    choice). The LoRA update ``scale * B(A(x))`` is computed in the model's dtype, as with kvpress's peft adapter.
    Deviations: those of KVzip here (float32 scores, sinks kept, every head keeps a pair).
    """

    adapter: str | None = None
    loaded: RestoreAdapter | None = field(default=None, repr=False)
    rewrites_cache: ClassVar[bool] = True  # it writes its restore tokens into the context's cache
    pass_name: ClassVar[str] = "RestoreKV"

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        super().post_init_from_model(model, tokenizer)
        if self.loaded is None:
            self.loaded = load_adapter(self.adapter or default_adapter(model.name_or_path or "",
                                                                       self.kvzip_plus_normalization))
        hidden = compat.text_config(model).hidden_size
        modules = dict(model.named_modules())
        missing = [name for name in self.loaded.lora if name not in modules]
        if self.loaded.embeddings.shape[-1] != hidden or missing:
            width = self.loaded.embeddings.shape[-1]
            raise PressError(f"RestoreKV adapter does not fit this model (hidden size {width} vs {hidden}, "
                             f"{len(missing)} unknown modules such as {missing[:1]}): use the adapter trained for "
                             "this model")
        parameter = next(model.parameters())
        # In each projection's dtype, as transformers' load_adapter (kvpress's loader) casts the LoRA factors.
        self.__dict__["_targets"] = {modules[name]: (a.to(modules[name].weight), b.to(modules[name].weight))
                                     for name, (a, b) in self.loaded.lora.items()}
        self.__dict__["_embeddings"] = self.loaded.embeddings.to(parameter.device, parameter.dtype)

    def shared_work_key(self):
        return None  # the restore pass writes into this press's own cache: nothing to share

    @property
    def n_restore_tokens(self) -> int:
        return 0 if self.loaded is None else self.loaded.embeddings.shape[0]

    def _lora_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        a, b = self.__dict__["_targets"][module]
        return output + F.linear(F.linear(args[0], a), b) * self.loaded.scale

    def _score_context(self, input_ids: torch.Tensor, cache, context_length: int) -> dict[int, torch.Tensor]:
        """KVzip's scores, then the restore pass: the cache ends at T + n (called with every press paused)."""
        scores = super()._score_context(input_ids, cache, context_length)
        handles = [module.register_forward_hook(self._lora_hook) for module in self.__dict__["_targets"]]
        try:
            with torch.no_grad():
                self._base_model(inputs_embeds=self.__dict__["_embeddings"][None],
                                 **{compat.model_cache_kwarg(): cache}, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        return scores

    def _select(self, scores: dict[int, torch.Tensor], compression_ratio: float | None = None):
        """KVzip's selection at ``ratio + n / T`` over the context; the n restore positions are kept."""
        context_length = next(iter(scores.values())).shape[-1]
        n = self.n_restore_tokens
        ratio = min(1.0, self.compression_ratio + n / context_length) if context_length else self.compression_ratio
        masks = super()._select(scores, ratio)
        return {layer: torch.cat([mask, mask.new_zeros((*mask.shape[:-1], n))], dim=-1)
                for layer, mask in masks.items()}

    @property
    def achieved_compression_ratio(self) -> float:
        """1 - kept pairs (restore tokens included) / the context's pairs, over the masks' compressed layers."""
        masks = [state["evicted"] for state in self._layer_state.values() if "evicted" in state]
        if not masks:
            return 0.0
        kept = sum(int((~m).sum()) for m in masks)
        context = sum(m[..., : m.shape[-1] - self.n_restore_tokens].numel() for m in masks)
        return 1 - kept / context if context else 0.0
