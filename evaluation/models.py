"""Load the model and tokenizer a sweep evaluates: an embedded short name, a local directory or a hub name."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from evaluation.config import ConfigError

logger = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_MODELS = {"kvtiny": EMBEDDED_DIR / "kvtiny"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name: str) -> str:
    """Embedded short names map to their folder; anything else is a local path or a hub name."""
    if name in EMBEDDED_MODELS:
        return str(EMBEDDED_MODELS[name])
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise ConfigError(f"model path '{name}' does not exist: give a model folder, a hub name (org/model) or "
                          f"{', '.join(EMBEDDED_MODELS)}")
    return str(Path(name).expanduser()) if looks_local else name


def model_fingerprint(name: str) -> str:
    """What identifies the model's weights in a run id: for a local folder (embedded models included) a hash of its
    config and weight files, press artifacts shipped beside it included (KVzap surrogates, DuoAttention patterns,
    Q-Filters, Fast KVzip gates), so retrained weights never resume an old run; for a hub name, the name itself.

    Weight files over 256 MiB are identified by name, size and modification time rather than read whole.
    """
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return name
    digest = hashlib.sha256()
    files = [file for pattern in ("*.json", "*.safetensors", "*.tsv", "*.pt") for file in sorted(path.rglob(pattern))]
    for file in files:  # KVzap surrogates, DuoAttention patterns, Q-Filters, Fast KVzip gates beside it too
        digest.update(str(file.relative_to(path)).encode())
        if file.stat().st_size <= 256 * 2**20:
            digest.update(file.read_bytes())
        else:
            digest.update(f"{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name: str, device: str | None = None, dtype: str = "auto", attn_implementation: str = "sdpa"):
    """(model in eval mode, tokenizer). An embedded model shipped without weights is built untrained from its config
    with seed 0 (a placeholder until its trained weights are committed)."""
    path = resolve_model_path(name)
    device = device or default_device()
    torch_dtype = DTYPES.get(dtype, "auto")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        has_weights = not Path(path).is_dir() or any(Path(path).glob("*.safetensors"))
        if has_weights:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                         attn_implementation=attn_implementation)
        else:
            logger.warning("%s has no weights yet: using an untrained model built from its config", name)
            config = AutoConfig.from_pretrained(path, attn_implementation=attn_implementation)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
            if isinstance(torch_dtype, torch.dtype):
                model = model.to(torch_dtype)
    except OSError as error:
        raise ConfigError(f"could not load model '{name}' ({str(error).splitlines()[0][:120]}): check the name, "
                          "or download it while online") from None
    model.name_or_path = path
    return model.to(device).eval(), tokenizer
