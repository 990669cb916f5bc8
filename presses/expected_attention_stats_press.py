from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from presses import compat
from presses.errors import PressError
from presses.expected_attention_press import ExpectedAttentionPress

STATS_FILE = "model.safetensors"


@dataclass
class ExpectedAttentionStatsPress(ExpectedAttentionPress):
    """Expected Attention with query statistics measured once on a corpus instead of on each context.

    kvpress's ExpectedAttentionStatsPress (Devoto et al., arXiv 2510.00636): per layer and query head, the mean
    ``query_mean`` (layers, heads, d) and covariance ``query_cov`` (layers, heads, d, d) of pre-RoPE queries
    (sinks excluded) are read from ``stats_folder`` (kvpress's format: ``model.safetensors`` with those two
    tensors, as written by :func:`save_query_statistics`), then rotated by the averaged future RoPE and used as in
    :class:`ExpectedAttentionPress`. ``dataset_name``, ``num_samples`` and ``sample_seq_len`` record how the
    statistics were measured (kvpress's defaults). Deviation: nothing is downloaded (kvpress fetches
    ``alessiodevoto/exp_att_stats_*`` from the hub); statistics are used in float32.
    """

    sample_seq_len: int = 1000
    num_samples: int = 100
    dataset_name: str = "kmfoda/booksum"
    stats_folder: str | None = None

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        super().post_init_from_model(model, tokenizer)
        path = Path(self.stats_folder or ".") / STATS_FILE
        if self.stats_folder is None or not path.is_file():
            raise PressError("ExpectedAttentionStatsPress needs query statistics: pass stats_folder=DIR holding "
                             f"{STATS_FILE} with query_mean and query_cov (see save_query_statistics)")
        stats = load_file(str(path))
        config = compat.text_config(model)
        expected = (config.num_hidden_layers, config.num_attention_heads)
        if tuple(stats["query_mean"].shape[:2]) != expected:
            raise PressError(f"ExpectedAttentionStatsPress: statistics for {tuple(stats['query_mean'].shape[:2])} "
                             f"(layers, heads), this model has {expected}")
        self.__dict__["_stats"] = (stats["query_mean"].float(), stats["query_cov"].float())

    def query_statistics(self, module: nn.Module, hidden_states: torch.Tensor, k_len: int):
        mean, covariance = (t[module.layer_idx].to(hidden_states.device) for t in self.__dict__["_stats"])
        rotation = self.average_rotation(module, k_len, hidden_states.device)
        mean = (mean @ rotation.T)[None].expand(hidden_states.shape[0], -1, -1)
        if not self.use_covariance:
            return mean, None
        return mean, (rotation @ covariance @ rotation.T)[None].expand(hidden_states.shape[0], -1, -1, -1)


@torch.no_grad()
def save_query_statistics(model: nn.Module, contexts: list[torch.Tensor], folder: str | Path, n_sink: int = 4) -> Path:
    """Measure pre-RoPE query mean and covariance over ``contexts`` (token id tensors (1, n)) and save them.

    Queries of every context past its ``n_sink`` first tokens are pooled per layer and head; the covariance is
    the unbiased one, as kvpress's ``collect_queries``.
    """
    modules = compat.attention_modules(model)
    pooled: dict[int, list[torch.Tensor]] = {module.layer_idx: [] for module in modules}

    def collect(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = compat.hidden_states_from(args, kwargs)[:, n_sink:]
        pooled[module.layer_idx].append(compat.query_states(module, hidden, None)[0].float())  # (heads, n, d)

    handles = [module.register_forward_pre_hook(collect, with_kwargs=True) for module in modules]
    try:
        for ids in contexts:
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    means, covariances = [], []
    for layer in sorted(pooled):
        queries = torch.cat(pooled[layer], dim=1)  # (heads, N, d)
        centered = queries - queries.mean(dim=1, keepdim=True)
        means.append(queries.mean(dim=1))
        covariances.append(centered.transpose(1, 2) @ centered / (queries.shape[1] - 1))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"query_mean": torch.stack(means).contiguous(), "query_cov": torch.stack(covariances).contiguous()},
              str(folder / STATS_FILE))
    return folder
