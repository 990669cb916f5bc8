"""KVgrad: KVzip's reconstruction, each pair's contribution weighted by how much the output depends on it.

"KVgrad" (OpenReview cg1wTCJjjk), merged into kvpress as ``KVgradPress`` (NVIDIA/kvpress PR #279): input x gradient
attribution on top of KVzip's context reconstruction (Kim et al., arXiv 2505.23416).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from presses import compat
from presses.kvzip_press import KVzipPress, kvzip_scores


class _ReadOnlyLayer(DynamicLayer):
    """A cache layer holding the prefilled context: a forward attends to [context | its own tokens] but stores
    nothing, so the replay needs no crop and the context's cache never enters the autograd graph."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.last = (torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2))
        return self.last


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters out of autograd for the block: the gradients needed are those of activations only."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


@dataclass
class KVgradPress(KVzipPress):
    """Evict the pairs whose contribution to the model's last hidden states during reconstruction is smallest.

    KVgrad (OpenReview cg1wTCJjjk) as kvpress's ``KVgradPress``. The context is replayed ``chunk_size`` tokens at a
    time with KVzip's repeat prompts (:class:`KVzipPress`), reading the prefilled cache without changing it. For
    each replay the objective ``Phi = sum_p ||h_p||^2`` over the R prompt tokens' outputs of the last decoder
    layer (before the final norm) is back-propagated to every layer's attention output ``o_p``; pair c of the
    chunk then scores ``max over p and the KV group's query heads of A_pc * ||W_o^h v_c|| * ||dPhi/do_p||``, A
    being KVzip's reconstruction attention (:func:`kvzip_scores` with ``query_weights``). Selection as KVzip: the
    ``compression_ratio`` lowest scores over all layers and heads (per layer with ``layerwise``), the first
    ``n_sink`` positions kept. One forward and one backward pass per chunk (3-4 prefills' cost); parameters are
    frozen meanwhile, so no parameter gradient is computed or left behind.

    Deviations from kvpress: as KVzip here, scores in float32 (kvpress: the model's dtype), sinks kept even inside
    the first chunk, and every head keeps a pair.
    """

    chunk_size: int = 512
    # KVgrad always weights the attention by ||W_o v||; KVzip+'s normalisation does not apply.
    kvzip_plus_normalization: bool = field(init=False, default=False, repr=False)
    pass_name: ClassVar[str] = "kvgrad"

    def shared_work_key(self):
        return ("kvgrad", self.n_sink, self.chunk_size)

    def _score_context(self, input_ids: torch.Tensor, cache, context_length: int) -> dict[int, torch.Tensor]:
        """KVgrad scores of the context's pairs, per layer: (1, kv_heads, context_length) float32 (prefix: 0)."""
        # Prefill tensors made under inference mode cannot enter a graph, even as constants: copy those.
        with torch.inference_mode(False):
            layers = []
            for module in self._modules:
                keys, values = compat.keys_values(cache, module.layer_idx)
                if keys.is_inference():
                    keys, values = keys.clone(), values.clone()
                layers.append(_ReadOnlyLayer(keys.detach(), values.detach()))
            replay = DynamicCache(config=self._base_model.config)
            replay.layers = layers
            scores = {module.layer_idx: torch.zeros((1, layer.keys.shape[1], context_length), dtype=torch.float32,
                                                    device=layer.keys.device)
                      for module, layer in zip(self._modules, layers, strict=True)}
            with torch.enable_grad(), _frozen(self._base_model):
                for key_slice, repeat_ids in self._repeat_prompts(input_ids[0].tolist()):
                    repeat = torch.tensor([repeat_ids], dtype=input_ids.dtype, device=input_ids.device)
                    for layer_idx, chunk_scores in self._score_chunk(repeat, replay, key_slice).items():
                        scores[layer_idx][..., key_slice] = chunk_scores
        return scores

    def _score_chunk(self, repeat: torch.Tensor, replay: DynamicCache, key_slice: slice) -> dict[int, torch.Tensor]:
        """One replay: forward, backward of Phi, then the scores of the chunk's pairs per layer (1, kv_heads, n)."""
        seen: dict = {"attention": {}}

        def attention_hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            output[0].retain_grad()  # o_p enters the residual stream, so dPhi/da_p is its gradient
            seen["attention"][module.layer_idx] = (compat.hidden_states_from(args, kwargs).detach(),
                                                   tuple(t.detach() for t in kwargs["position_embeddings"]), output[0])

        def objective_hook(module: nn.Module, args: tuple, output) -> None:
            seen["last"] = output[0] if isinstance(output, tuple) else output

        handles = [module.register_forward_hook(attention_hook, with_kwargs=True) for module in self._modules]
        handles.append(compat.decoder_layers(self._base_model)[-1].register_forward_hook(objective_hook))
        try:
            embeds = self._base_model.get_input_embeddings()(repeat).detach().requires_grad_(True)
            self._base_model(inputs_embeds=embeds, **{compat.model_cache_kwarg(): replay}, use_cache=True)
            seen["last"].float().square().sum().backward()
        finally:
            for handle in handles:
                handle.remove()
        chunk_scores = {}
        with torch.no_grad():
            for module in self._modules:
                hidden, position_embeddings, attention_output = seen["attention"][module.layer_idx]
                keys, values = replay.layers[module.layer_idx].last
                gradient_norms = attention_output.grad.float().norm(dim=-1)  # (1, R)
                chunk_scores[module.layer_idx] = kvzip_scores(module, hidden, position_embeddings, keys.detach(),
                                                              values.detach(), key_slice, n_sink=self.n_sink,
                                                              query_weights=gradient_norms)
        return chunk_scores
