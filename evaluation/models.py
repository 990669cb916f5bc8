"""Load the model and tokenizer a sweep evaluates: an embedded short name, a local directory or a hub name."""

from __future__ import annotations

import hashlib
import importlib.util
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")
ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def check_model(name: str) -> None:
    """A local model folder must hold a config.json and a tokenizer; checked without loading anything. Hub names are
    checked when they load (offline, a missing one fails there with its own one-line error)."""
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return
    if not (path / "config.json").is_file():
        raise ConfigError(f"model folder '{name}' has no config.json: give a folder written by save_pretrained "
                          "(config.json, weights, tokenizer)")
    if not any((path / file).is_file() for file in TOKENIZER_FILES):
        raise ConfigError(f"model folder '{name}' has no tokenizer (tokenizer.json, tokenizer.model or vocab.json): "
                          "save the tokenizer into it too (tokenizer.save_pretrained)")


def check_device(device: str | None) -> None:
    """``device`` must name a device this machine has (cpu, cuda, cuda:N, mps); None picks one."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device '{device}' is not a device: use cpu, cuda, cuda:1, mps ...") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device}: this machine has no CUDA GPU (or torch was built without CUDA): "
                              "use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} GPU(s) (cuda:0 to cuda:{count - 1})")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available on this machine: use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device}: kvpress-eval runs on cpu, cuda or mps")


def check_attn_implementation(attn_implementation: str, device: str | None) -> None:
    """Flash attention needs its package installed and a CUDA device."""
    package = ATTENTION_PACKAGES.get(attn_implementation)
    if package is None:
        return
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"--attn_implementation {attn_implementation} needs the '{package}' package, which is not "
                          "installed: install it or use --attn_implementation sdpa")
    if (device or default_device()).split(":")[0] != "cuda":
        raise ConfigError(f"--attn_implementation {attn_implementation} runs on CUDA GPUs only: use sdpa on "
                          f"{device or default_device()}")


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
