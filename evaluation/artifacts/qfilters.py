"""``kvpress-eval build-qfilters``: Q-Filters for any model from its queries over text.

Q-Filters (Godey et al., arXiv 2503.02812): per layer and KV head, the queries (with RoPE, all query heads of the
group) over the texts are stacked and the first right singular vector ``v`` of that matrix is taken, oriented so that
the queries' mean projection on it is positive. kvpress scores a key ``-(filter . key)``, so the filter saved is
``-v``: keys pointing along the queries' dominant direction score high. The SVD is taken through the (head_dim,
head_dim) Gram matrix accumulated text by text, so memory does not grow with the texts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evaluation.kvzap.train import TrainSettings, load_texts
from presses import compat
from presses.qfilter_press import QFILTERS_FOLDER, save_qfilters


@torch.no_grad()
def query_filters(model, contexts: list[torch.Tensor]) -> torch.Tensor:
    """(layers, kv_heads, head_dim) filters from token id tensors (1, n)."""
    modules = compat.attention_modules(model)
    config = compat.text_config(model)
    device = next(model.parameters()).device
    gram: dict[int, torch.Tensor] = {}
    total: dict[int, torch.Tensor] = {}

    def hook(module, args: tuple, kwargs: dict) -> None:
        queries = compat.query_states(module, compat.hidden_states_from(args, kwargs), kwargs["position_embeddings"])
        batch, heads, n, dim = queries.shape
        kv_heads = heads // compat.num_key_value_groups(module)
        grouped = queries.float().reshape(batch, kv_heads, -1, dim).transpose(0, 1).reshape(kv_heads, -1, dim)
        gram[module.layer_idx] = gram.get(module.layer_idx, 0) + grouped.transpose(1, 2) @ grouped
        total[module.layer_idx] = total.get(module.layer_idx, 0) + grouped.sum(1)

    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in modules]
    try:
        for ids in contexts:
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    filters = []
    for layer_idx in range(config.num_hidden_layers):
        _, vectors = torch.linalg.eigh(gram[layer_idx].double())  # ascending eigenvalues
        principal = vectors[..., -1].float()  # (kv_heads, head_dim)
        sign = torch.sign((total[layer_idx] * principal).sum(-1, keepdim=True))
        filters.append(-principal * torch.where(sign == 0, 1.0, sign))
    return torch.stack(filters)


def build_qfilters(model, tokenizer, output_dir: str | Path, settings: TrainSettings) -> Path:
    """Filters over the texts of ``settings``, written to ``<output_dir>/qfilters``."""
    texts = load_texts(settings, tokenizer)
    contexts = [torch.tensor([tokenizer.encode(text, add_special_tokens=False)]) for text in texts]
    return save_qfilters(Path(output_dir) / QFILTERS_FOLDER, query_filters(model, contexts))
