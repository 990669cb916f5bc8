"""What KVzap's surrogate costs in a prefill, measured side by side: ``python -m evaluation.benchmarks.kvzap_overhead``.

Prints, for each model and context length, the median prefill time with no press and with ``kvzap_mlp`` (the
registry's DMS threshold press over the MLP surrogate: scoring plus eviction bookkeeping), runs interleaved so both
see the same machine load, and their ratio. Models: the embedded model (its shipped surrogate, else a random one of
the right shape) and a randomly initialised stack of 2 Qwen3-8B-shaped layers (hidden 4096, 32 query heads, 8 KV
heads, head_dim 128, MLP 12288) with a random 512-wide surrogate. Also prints the analytic ratio of surrogate to
layer multiply-accumulates per token for Qwen3-8B's shapes (the paper's ~1.1% of a layer's linear projections).
Target: ratio <= 1.02 on the 8B-shaped stack. Timings are wall-clock on whatever device is given.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import fire
import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from presses import build_press
from presses.compat import model_cache_kwarg
from presses.generation import device_clock
from presses.kvzap_press import KVzapConfig, KVzapModel

QWEN3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288)


def flop_ratio(hidden: int = 4096, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
               intermediate: int = 12288, surrogate_hidden: int = 512) -> float:
    """MLP surrogate / one layer's linear projections, in multiply-accumulates per token.

    The layer counts q/k/v/o and the gated MLP's three projections; attention scores themselves add more with
    context length, which only lowers the ratio.
    """
    projections = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * intermediate
    surrogate = hidden * surrogate_hidden + surrogate_hidden * kv_heads
    return surrogate / (projections + mlp)


@torch.no_grad()
def prefill_seconds(model, press, ids: torch.Tensor) -> float:
    cache = DynamicCache(config=model.config)
    start = device_clock(ids.device)
    if press is None:
        model(input_ids=ids, **{model_cache_kwarg(): cache}, use_cache=True)
    else:
        with press(model):
            model(input_ids=ids, **{model_cache_kwarg(): cache}, use_cache=True)
    return device_clock(ids.device) - start


def measure(model, checkpoint: str, length: int, repeats: int, device: str) -> tuple[float, float]:
    """Median prefill seconds (no press, kvzap_mlp), interleaved, after one warm-up of each."""
    ids = torch.randint(10, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    press = build_press("kvzap_mlp", threshold=-4.0, checkpoint=checkpoint)
    prefill_seconds(model, None, ids)
    prefill_seconds(model, press, ids)
    plain, pressed = [], []
    for _ in range(repeats):
        plain.append(prefill_seconds(model, None, ids))
        pressed.append(prefill_seconds(model, press, ids))
    return statistics.median(plain), statistics.median(pressed)


def random_surrogate(model, folder: Path, hidden_dim: int) -> str:
    config = model.config
    KVzapModel(KVzapConfig(input_dim=config.hidden_size, output_dim=config.num_key_value_heads,
                           n_modules=config.num_hidden_layers, hidden_dim=hidden_dim)).save_pretrained(str(folder))
    return str(folder)


def main(lengths: str = "1024,4096", repeats: int = 5, device: str = "cpu", dtype: str = "float32",
         skip_8b: bool = False) -> None:
    from evaluation.models import load_model

    torch_dtype = getattr(torch, dtype)
    lengths = [int(n) for n in (lengths.split(",") if isinstance(lengths, str) else
                                  lengths if isinstance(lengths, (list, tuple)) else [lengths])]
    print(f"analytic: Qwen3-8B MLP surrogate / layer (q, k, v, o and MLP projections) = {100 * flop_ratio():.2f}% "
          "of the multiply-accumulates per token")
    print(f"{'model':<22} {'tokens':>6} {'no_press s':>11} {'kvzap_mlp s':>12} {'ratio':>7}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        embedded, _ = load_model("kvtiny", device, dtype)
        shipped = Path(embedded.name_or_path) / "kvzap-mlp"
        checkpoint = str(shipped) if shipped.is_dir() else random_surrogate(
            embedded, Path(scratch) / "kvtiny", embedded.config.hidden_size // 8)
        models = [("kvtiny", embedded, checkpoint)]
        if not skip_8b:
            config = Qwen3Config(vocab_size=1024, num_hidden_layers=2, max_position_embeddings=max(lengths) + 8,
                                 **QWEN3_8B)
            torch.manual_seed(0)
            stack = Qwen3ForCausalLM(config).to(device=device, dtype=torch_dtype).eval()
            models.append(("qwen3-8b-shaped x2", stack, random_surrogate(stack, Path(scratch) / "8b", 512)))
        for name, model, surrogate in models:
            for length in lengths:
                plain, pressed = measure(model, surrogate, length, repeats, device)
                print(f"{name:<22} {length:>6} {plain:>11.4f} {pressed:>12.4f} {pressed / plain:>7.3f}", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
