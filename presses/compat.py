"""Everything that differs between transformers versions and model architectures, in one place.

Presses never read transformers internals directly: they go through these functions. When a new transformers
release renames something (5.24 renamed the attention layer's ``past_key_values`` argument to ``cache``), this is
the only module to change.
"""

from __future__ import annotations

import inspect
import sys
from functools import cache

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers.cache_utils import DynamicLayer

from presses.errors import PressError

TRANSFORMERS_VERSION = Version(transformers.__version__)

# model_type -> how to read its attention layers. Gemma3's sliding-window layers keep only a window of keys in
# their cache, so positions there do not line up with the prompt: presses skip them (as kvpress does).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "gemma3_text")


@cache
def attention_cache_kwarg() -> str:
    """Name of the cache argument of the attention modules: ``cache`` from 5.24, ``past_key_values`` before."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    params = inspect.signature(LlamaAttention.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def model_cache_kwarg() -> str:
    """Name of the cache argument of ``model.forward``; the old name still works in 5.x but warns from 5.24."""
    return attention_cache_kwarg()


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Decoder layers of a supported causal LM, or a one-line :class:`PressError` naming what is supported."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PressError(
            f"unsupported architecture '{model_type}': presses support {', '.join(SUPPORTED_MODEL_TYPES)}; "
            "use one of those model families"
        )
    base = model.model if hasattr(model, "model") else model
    base = getattr(base, "language_model", base)
    return list(base.layers)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules whose cache a press may compress (full-attention layers only)."""
    return [layer.self_attn for layer in decoder_layers(model) if not is_sliding_layer(layer.self_attn)]


def is_sliding_layer(module: nn.Module) -> bool:
    layer_types = getattr(module.config, "layer_types", None)
    if layer_types is not None:
        return layer_types[module.layer_idx] == "sliding_attention"
    return bool(getattr(module, "is_sliding", False))


def cache_from_kwargs(kwargs: dict):
    """The cache object passed to an attention module (``cache`` or ``past_key_values``)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        raise PressError("presses need a KV cache: call the model with use_cache=True (the default)")
    return cache


def cache_from_output(output):
    """The cache a model forward returned (``cache`` from 5.24, ``past_key_values`` before), or None."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def hidden_states_from(args: tuple, kwargs: dict) -> torch.Tensor:
    """Hidden states entering the attention module, shape (batch, q_len, hidden_size)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def cache_layer(cache, layer_idx: int):
    """One layer object of a cache (``cache.layers`` in every 5.x)."""
    return cache.layers[layer_idx]


def replace_cache_layer(cache, layer_idx: int, layer):
    """Swap one layer object of a cache (compact storage replaces an empty ``DynamicLayer``); returns it."""
    cache.layers[layer_idx] = layer
    return layer


def set_attn_implementation(model: nn.Module, name: str) -> None:
    """Route the attention of every layer through ``name`` (a registered attention function), without the checks
    of ``model.set_attn_implementation`` (which rejects names it does not know as kernels)."""
    configs = {id(model.config): model.config}
    for module in attention_modules(model):
        configs[id(module.config)] = module.config
    for config in configs.values():
        config._attn_implementation = name


def keys_values(cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached keys and values of one layer, each (batch, kv_heads, k_len, head_dim); keys already carry RoPE.

    A compact layer's freed positions read as zeros (a copy: see ``CompactLayer.logical_keys_values``).
    """
    layer = cache.layers[layer_idx]
    if hasattr(layer, "logical_keys_values"):
        return layer.logical_keys_values()
    check_pressable_layer(layer, layer_idx)
    if layer.keys is None:
        raise PressError(f"layer {layer_idx} of the cache holds nothing yet: a press reads it after its forward")
    return layer.keys, layer.values


def check_pressable_layer(layer, layer_idx: int) -> None:
    """A one-line error unless ``layer`` is a plain ``DynamicLayer``, the only layer a press can compress.

    Sliding-window layers drop tokens of their own; quantized layers (quanto, HQQ, FP8) hold their pairs in a form a
    press cannot read or free; static layers are preallocated to a fixed length.
    """
    if getattr(layer, "is_sliding", False):
        raise PressError(f"layer {layer_idx} uses a sliding-window cache, which presses cannot compress")
    if type(layer) is not DynamicLayer:
        raise PressError(f"cache layer type {type(layer).__name__} is not supported: use a DynamicCache")


def cache_length(cache, layer_idx: int = 0) -> int:
    return cache.get_seq_length(layer_idx)


def crop_cache(cache, length: int) -> None:
    """Drop every cached position from ``length`` on (a negative argument means 'remove n' in every 5.x)."""
    to_remove = cache.get_seq_length() - length
    if to_remove > 0:
        cache.crop(-to_remove)


def attn_implementation(module: nn.Module) -> str:
    return getattr(module.config, "_attn_implementation", None) or "eager"


def num_key_value_groups(module: nn.Module) -> int:
    config = module.config
    return config.num_attention_heads // config.num_key_value_heads


def head_dim(module: nn.Module) -> int:
    config = module.config
    return getattr(module, "head_dim", None) or config.hidden_size // config.num_attention_heads


def query_states(module: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Queries of ``hidden_states`` with RoPE applied, shape (batch, num_heads, q_len, head_dim).

    ``position_embeddings`` = (cos, sin) for these positions; None returns the queries before RoPE.
    Handles the fused ``qkv_proj`` of Phi3 and the per-head ``q_norm`` of Qwen3 and Gemma3.
    """
    batch, q_len, _ = hidden_states.shape
    num_heads, dim = module.config.num_attention_heads, head_dim(module)
    if hasattr(module, "q_proj"):
        queries = module.q_proj(hidden_states)
    else:  # Phi3: fused projection, queries come first
        queries = module.qkv_proj(hidden_states)[..., : num_heads * dim]
    queries = queries.view(batch, q_len, num_heads, dim)
    if hasattr(module, "q_norm"):
        queries = module.q_norm(queries)
    queries = queries.transpose(1, 2)
    if position_embeddings is None:
        return queries
    cos, sin = position_embeddings
    # Each modeling file defines its own RoPE (Phi3 rotates only part of the head): use the model's.
    apply_rotary_pos_emb = sys.modules[type(module).__module__].apply_rotary_pos_emb
    queries, _ = apply_rotary_pos_emb(queries, queries, cos, sin)
    return queries


def output_projection_per_head(module: nn.Module) -> torch.Tensor:
    """``o_proj`` weight split per query head: (num_heads, head_dim, hidden_size)."""
    weight = module.o_proj.weight  # (hidden, num_heads * head_dim)
    return weight.T.reshape(module.config.num_attention_heads, head_dim(module), -1)


MASKING_IMPLEMENTATIONS = ("sdpa", "eager")  # attention that takes an arbitrary mask, so evicted pairs can be hidden


def padding_keys(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, k_len) True at keys no query of the forward may see (padding), from a prefill's attention mask, or
    None when there is no padding.

    sdpa and eager get a 4D mask (boolean, True = attend; additive float): a prefill's last query sees every key
    that is not padding, so its row says which keys are. flash-attention gets the 2D padding mask (1 = token).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        blocked = attention_mask == 0
        return blocked if bool(blocked.any()) else None
    last = attention_mask[:, 0, -1, :]
    blocked = ~last if last.dtype == torch.bool else last <= torch.finfo(last.dtype).min / 2
    return blocked if bool(blocked.any()) else None


def mask_evicted_pairs(
    module: nn.Module,
    attention_mask: torch.Tensor | None,
    evicted: torch.Tensor,
    q_len: int,
) -> torch.Tensor:
    """Combine the model's attention mask with per-KV-head evictions, for sdpa and eager attention.

    ``evicted`` is (batch, kv_heads, k_len), True where a pair was removed. The result is a (batch, num_heads, q_len,
    k_len) mask in the form the attention implementation expects: boolean (True = attend) for sdpa, additive float
    (0 or dtype min) for eager. An evicted key thus gets exactly zero attention weight.
    """
    implementation = attn_implementation(module)
    if implementation not in MASKING_IMPLEMENTATIONS:
        raise PressError(
            f"per-head eviction needs attn_implementation 'sdpa' or 'eager', got '{implementation}': "
            "load the model with attn_implementation='sdpa'"
        )
    batch, _, k_len = evicted.shape
    keep = ~evicted.repeat_interleave(num_key_value_groups(module), dim=1)[:, :, None, :]
    if attention_mask is None:  # sdpa dropped a plain causal mask: rebuild it
        past = k_len - q_len
        rows = torch.arange(q_len, device=evicted.device)[:, None] + past
        allowed = torch.arange(k_len, device=evicted.device)[None, :] <= rows
        allowed = allowed[None, None] & keep
        float_dtype = None if implementation == "sdpa" else module.o_proj.weight.dtype
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :k_len] & keep
        float_dtype = None
    else:
        float_dtype = attention_mask.dtype
        allowed = (attention_mask[..., :k_len] > torch.finfo(float_dtype).min / 2) & keep
    if float_dtype is None:
        return allowed
    zero = torch.zeros((), dtype=float_dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(float_dtype).min)
