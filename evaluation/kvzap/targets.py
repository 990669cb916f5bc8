"""KVzip+ training targets for KVzap surrogates: (hidden state entering attention, log KVzip+ score) pairs.

Follows KVzap's data collection (Jegou et al., arXiv 2601.07891; reference.md section 4.3): a text P becomes the chat
``user: P + "\\n\\nRepeat the previous context exactly."``, ``assistant: P``; one forward over it, and for every layer,
query head h, query t in the repeated span R and key i in the original span P::

    s[h, t, i] = A[h, t, i] * ||W_o^h v_i|| / ||x_t||        target[k, i] = log max_{h in group k} max_{t in R} s

with A the causal attention probabilities over the whole sequence (float32 here) and x_t the hidden state entering
attention at t. The input of the surrogate is x_i, the hidden state entering attention at the original token i.
Deviation: the forward stops at the end of R (the chat template's closing tokens cannot change R's attention), and
scores below 1e-30 are floored before the log so that no target is -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from presses import compat
from presses.kvzip_press import REPEAT_FIRST_CHUNK, kvzip_scores

SCORE_FLOOR = 1e-30


@dataclass
class TextTargets:
    """Pairs from one text: ``hidden`` (n, layers, hidden_size) and ``targets`` (n, layers, kv_heads), float32."""

    hidden: torch.Tensor
    targets: torch.Tensor


def repeat_prompt(tokenizer, text: str) -> tuple[torch.Tensor, list[int], slice]:
    """Token ids of the repeat chat (ending with the repeated span), the positions of P's tokens, and R's span.

    Spans are found from character offsets, as KVzap's collector does; P's tokens are those lying wholly inside the
    original text, R's those inside its repetition.
    """
    text = text.strip()
    if getattr(tokenizer, "chat_template", None) is None:
        prompt = text + REPEAT_FIRST_CHUNK + "\n" + text
    else:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": text + REPEAT_FIRST_CHUNK}, {"role": "assistant", "content": text}],
            tokenize=False, enable_thinking=False)
    original_start = prompt.index(text)
    repeat_start = prompt.index(text, original_start + len(text) + len(REPEAT_FIRST_CHUNK))
    encoding = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]

    def inside(start: int) -> list[int]:
        return [i for i, (a, b) in enumerate(offsets) if start <= a and b <= start + len(text) and b > a]

    original, repeated = inside(original_start), inside(repeat_start)
    if not original or not repeated:
        raise ValueError("the text produced no tokens to score")
    end = repeated[-1] + 1
    return torch.tensor([encoding["input_ids"][:end]]), original, slice(repeated[0], end)


@torch.no_grad()
def collect_targets(model: nn.Module, tokenizer, text: str, n_positions: int,
                    generator: torch.Generator, plus_normalization: bool = True) -> TextTargets:
    """KVzip+ targets of ``n_positions`` random tokens of ``text`` (all of them if it has fewer), every layer.

    With ``plus_normalization=False`` the targets are log plain KVzip scores (max attention; Fast KVzip's target).
    """
    input_ids, original, repeated = repeat_prompt(tokenizer, text)
    device = next(model.parameters()).device
    modules = compat.attention_modules(model)
    if len(modules) != len(compat.decoder_layers(model)):
        raise ValueError("KVzap targets need every layer to attend to the whole context (no sliding-window layers)")
    chosen = torch.tensor(original)[torch.randperm(len(original), generator=generator)[:n_positions]].sort().values
    hidden, targets = {}, {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        states = compat.hidden_states_from(args, kwargs)
        keys, values = compat.keys_values(compat.cache_from_kwargs(kwargs), module.layer_idx)
        cos, sin = kwargs["position_embeddings"]
        scores = kvzip_scores(module, states[:, repeated], (cos[:, repeated], sin[:, repeated]), keys, values,
                              slice(0, repeated.start), plus_normalization=plus_normalization)
        targets[module.layer_idx] = scores[0][:, chosen.to(scores.device)].clamp_min(SCORE_FLOOR).log().T.cpu()
        hidden[module.layer_idx] = states[0, chosen.to(states.device)].float().cpu()

    handles = [module.register_forward_hook(hook, with_kwargs=True) for module in modules]
    try:
        model(input_ids=input_ids.to(device), **{compat.model_cache_kwarg(): DynamicCache(config=model.config)},
              use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    layers = sorted(hidden)
    return TextTargets(torch.stack([hidden[i] for i in layers], dim=1), torch.stack([targets[i] for i in layers], 1))
