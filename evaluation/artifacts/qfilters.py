"""``kvpress-eval build-qfilters``: Q-Filters for any model from its queries over text.

Q-Filters (Godey et al., arXiv 2503.02812, section 3.2): for each layer and each query head, the queries (with RoPE,
as the authors collect them from the attention forward) over the texts are stacked, not centred, and the first right
singular vector ``v`` of that matrix is taken, its sign fixed so that the queries' mean projection on it is positive
(``v+``). Under GQA the ``v+`` of the query heads sharing a KV head are averaged onto it. The paper's estimate is
``E_q[q . k] ~ kappa * (k . v+)`` with ``kappa = E[q . v+] > 0``: a key with a higher projection on ``v+`` gets more
attention on average, so it is the one to keep. kvpress (QFilterPress, written by the paper's first author) scores a
key ``-(filter . key)`` and keeps the highest scores, so the filter saved is ``-v+`` averaged: the published
``nthngdy/*_qfilt`` layout read by kvpress's own score ranks keys as the paper does.

The SVD of each head is taken through its (head_dim, head_dim) Gram matrix accumulated text by text (the right
singular vectors of ``Q`` are the eigenvectors of ``Q^T Q``), so memory does not grow with the texts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evaluation.config import ConfigError
from evaluation.kvzap.train import TrainSettings, load_texts
from presses import compat
from presses.qfilter_press import QFILTERS_FOLDER, save_qfilters


def principal_directions(gram: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``v+`` per head from the Gram matrices (heads, d, d) and the summed queries (heads, d): (heads, d), unit norm.

    The top eigenvector of ``Q^T Q`` is the first right singular vector of ``Q``; its sign is arbitrary, so it is
    flipped where the queries' mean projection on it is negative (the paper's ``sgn(1^T u_1) v_1``).
    """
    _, vectors = torch.linalg.eigh(gram.double())  # ascending eigenvalues
    principal = vectors[..., -1]
    sign = torch.sign((total.double() * principal).sum(-1, keepdim=True))
    return (principal * torch.where(sign == 0, 1.0, sign)).float()


@torch.no_grad()
def query_filters(model, contexts: list[torch.Tensor]) -> torch.Tensor:
    """(layers, kv_heads, head_dim) filters, in kvpress's orientation, from token id tensors (1, n)."""
    modules = compat.attention_modules(model)
    config = compat.text_config(model)
    device = next(model.parameters()).device
    gram: dict[int, torch.Tensor] = {}
    total: dict[int, torch.Tensor] = {}
    groups: dict[int, int] = {}

    def hook(module, args: tuple, kwargs: dict) -> None:
        queries = compat.query_states(module, compat.hidden_states_from(args, kwargs), kwargs["position_embeddings"])
        # (batch, heads, n, d) -> (heads, batch * n, d): one query matrix per query head.
        per_head = queries.float().transpose(0, 1).flatten(1, 2)
        gram[module.layer_idx] = gram.get(module.layer_idx, 0) + per_head.transpose(1, 2) @ per_head
        total[module.layer_idx] = total.get(module.layer_idx, 0) + per_head.sum(1)
        groups[module.layer_idx] = compat.num_key_value_groups(module)

    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in modules]
    try:
        for ids in contexts:
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if not gram:
        raise ConfigError("the model has no full-attention layer: Q-Filters have nothing to filter")
    head_dim = next(iter(total.values())).shape[-1]
    filters = []
    for layer_idx in range(config.num_hidden_layers):
        if layer_idx not in gram:  # sliding-window layer: presses never compress it, the layout still holds a row
            filters.append(torch.zeros(config.num_key_value_heads, head_dim))
            continue
        directions = principal_directions(gram[layer_idx], total[layer_idx])  # (heads, d)
        # Query heads h * groups .. (h + 1) * groups - 1 read KV head h (transformers' repeat_kv).
        per_kv_head = directions.view(-1, groups[layer_idx], directions.shape[-1]).mean(1)
        filters.append(-per_kv_head)  # kvpress keeps the highest -(filter . key), i.e. the highest key . v+
    return torch.stack(filters)


def build_qfilters(model, tokenizer, output_dir: str | Path, settings: TrainSettings) -> Path:
    """Filters over the texts of ``settings``, written to ``<output_dir>/qfilters``."""
    texts = load_texts(settings, tokenizer)
    contexts = [torch.tensor([tokenizer.encode(text, add_special_tokens=False)]) for text in texts]
    return save_qfilters(Path(output_dir) / QFILTERS_FOLDER, query_filters(model, contexts))
