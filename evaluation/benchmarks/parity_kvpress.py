"""Which pairs does each press keep here and in kvpress 0.5.5, on the same tiny random models and inputs?

    python -m evaluation.benchmarks.parity_kvpress --kvpress_python /work/kvpress-venv/bin/python

This side writes tiny random Llama and Qwen3 models (``save_pretrained``, fixed seed) and the input ids to a work
folder, computes what each press keeps in every (layer, KV head), then runs this same file with ``--side kvpress``
under the side environment's python (kvpress 0.5.5, transformers < 5.3; see the README), which imports only torch,
transformers and kvpress and writes kvpress's kept sets. kvpress is a measuring tool here, never a dependency.

How kept sets are read: ours from the eviction masks; kvpress's from ``module.masked_key_indices`` for its masking
presses (AdaKV family) and otherwise by finding each kept key row's nearest row among the keys of an uncompressed
prefill (kvpress gathers rows, so they are equal up to the rounding of a different attention kernel; RoPE makes
every row distinct). ThinK keeps sequence pairs; its "kept set"
is the set of key channels it did not zero. FINCH runs on the context with its delimiter token after 250 tokens (the
rest is the question); kvpress's FINCH gathers keys without re-rotating them so that its rows can be found. RestoreKV's
kept sets cover the context; the keys and values of its restore tokens are compared apart (kvpress loads the adapter,
written here in the published layout, with peft).

Cases: Llama and Qwen3 (4 layers, 4 query and 2 KV heads, head_dim 16), an odd context of 301 tokens, ratios
0.25 / 0.5 / 0.75, float32 and bfloat16. Reported per press and case: the share of (layer, KV head) with identical
kept sets, and the mean Jaccard overlap |A & B| / |A | B|. Random presses are left out (different generators), as are
decoding presses (they act after the prefill) and the KVzap family (trained surrogates; covered by the KVzap
checkpoint tests). The KVzip family (kvzip, kvzip_plus, kvgrad, RestoreKV) reads a word-level tokenizer saved beside
each model (no chat template) and, for RestoreKV, a random adapter saved there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "qwen3")
RATIOS = (0.25, 0.5, 0.75)
DTYPES = ("float32", "bfloat16")
CONTEXT_LENGTH = 301
EAGER = {"observed_attention"}

# Our registry name -> kvpress constructor (evaluated in kvpress's namespace with r = the ratio).
KVPRESS_CONSTRUCTORS = {
    "knorm": "KnormPress(r)",
    "snapkv": "SnapKVPress(r)",
    "streaming_llm": "StreamingLLMPress(r)",
    "tova": "TOVAPress(r)",
    "observed_attention": "ObservedAttentionPress(r)",
    "expected_attention": "AdaKVPress(ExpectedAttentionPress(r, epsilon=1e-2))",
    "expected_attention_plain": "ExpectedAttentionPress(r)",
    "adakv_snapkv": "AdaKVPress(SnapKVPress(r))",
    "adakv_expected_attention": "AdaKVPress(ExpectedAttentionPress(r))",
    "pyramidkv": "PyramidKVPress(r)",
    "keydiff": "KeyDiffPress(r)",
    "lagkv": "LagKVPress(r)",
    "chunkkv": "ChunkKVPress(press=SnapKVPress(r), chunk_length=20)",
    "block_keydiff": "BlockPress(press=KeyDiffPress(r), block_size=128)",
    "critical_snapkv": "CriticalKVPress(SnapKVPress(r))",
    "critical_expected_attention": "CriticalKVPress(ExpectedAttentionPress(r, use_vnorm=False))",
    "critical_adakv_snapkv": "CriticalAdaKVPress(SnapKVPress(r))",
    "critical_adakv_expected_attention": "CriticalAdaKVPress(ExpectedAttentionPress(r, use_vnorm=False))",
    "cur": "CURPress(r)",
    "cap": "CapPress(r)",
    "lukv": "with_curve(LUKVPress(ExpectedAttentionPress(epsilon=2e-2), compression_ratio=r, sink=4, window=1))",
    "think": "ThinKPress(key_channel_compression_ratio=r)",
    "non_causal_attention": "NonCausalAttnPress(r)",
    "leverage": "LeverageScorePress(r)",
    "compactor": "CompactorPress(r)",
    "adakv_compactor": "AdaKVPress(CompactorPress(r))",
    "kvcompose": "KVComposePress(compression_ratio=r)",
    "kvcompose_unstructured": "KVComposePress(structured=False, compression_ratio=r)",
    "merging_knorm": "MergingPress(KnormPress(r))",
    "merging_snapkv": "MergingPress(SnapKVPress(r))",
    "merging_expected_attention": "MergingPress(ExpectedAttentionPress(r, epsilon=1e-2))",
    # Keys are gathered, not re-rotated, on kvpress's side so its kept rows can be found (the kept set is the same).
    "finch": "with_delimiter(FinchPress(r, rerotate_keys=False))",
    "kvzip": "KVzipPress(r)",
    "kvzip_plus": "KVzipPress(r, kvzip_plus_normalization=True)",
    "kvgrad": "KVgradPress(r)",
    "RestoreKV": "with_adapter(RestoreKVPress(r))",
    "RestoreKV_plus": "with_adapter(RestoreKVPress(r, kvzip_plus_normalization=True))",
}
# FINCH's prompt: the context's first QUESTION_AT tokens, the delimiter, then the rest as the question.
DELIMITER, QUESTION_AT = 255, 250
# Presses that read the tokenizer (KVzip's repeat prompt) or a RestoreKV adapter saved beside the model.
TOKENIZER_PRESSES = {"kvzip", "kvzip_plus", "kvgrad", "RestoreKV", "RestoreKV_plus"}
RESTORED = "restored|"  # result keys of RestoreKV's restore-token keys and values
REPEAT_WORDS = "Repeat the previous context exactly. Repeat the part of the previous context exactly, starting with"
# Presses that draw random numbers (Compactor's sketch): both sides seed torch identically before each forward.
SEED = 0


def tiny_config(architecture: str):
    from transformers import LlamaConfig, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen3": Qwen3Config}[architecture]
    return cls(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=False)


def write_inputs(folder: Path) -> None:
    """The models (one per architecture, seeded) and the context ids, for both sides."""
    from transformers import AutoModelForCausalLM

    for i, architecture in enumerate(ARCHITECTURES):
        torch.manual_seed(i)
        AutoModelForCausalLM.from_config(tiny_config(architecture)).save_pretrained(folder / architecture)
        # A LU-KV budget curve (per ratio, per-head prune ratios spread around the ratio) for the lukv press.
        config = tiny_config(architecture)
        spread = torch.rand(99, config.num_hidden_layers, config.num_key_value_heads) * 0.2 - 0.1
        curve = torch.arange(1, 100)[:, None, None] / 100 + spread - spread.mean(dim=-1, keepdim=True)
        (folder / f"lukv-{architecture}.json").write_text(json.dumps(curve.clamp(0, 0.995).tolist()))
        tiny_tokenizer().save_pretrained(folder / architecture)
        from presses.restorekv_press import local_folder, random_adapter, save_adapter

        model = AutoModelForCausalLM.from_pretrained(folder / architecture)
        for plus in (False, True):  # a random adapter in the published layout; kvpress loads it with peft
            torch.manual_seed(10 + i)
            save_adapter(folder / architecture / local_folder(plus), random_adapter(model), rank=8, alpha=16)
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, DELIMITER, (1, CONTEXT_LENGTH), generator=generator)  # the delimiter occurs only once
    (folder / "ids.json").write_text(json.dumps(ids[0].tolist()))


def tiny_tokenizer():
    """A word-level tokenizer over the 256 ids, no chat template: KVzip's repeat prompt words have ids of their own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", *dict.fromkeys(REPEAT_WORDS.replace(".", " .").replace(",", " ,").split())]
    vocab = {word: i for i, word in enumerate(words + [f"t{i}" for i in range(256 - len(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def prompt_ids(folder: Path, name: str) -> torch.Tensor:
    """The ids a press is run on: the shared context, with FINCH's delimiter inserted for finch."""
    ids = json.loads((folder / "ids.json").read_text())
    if name == "finch":
        ids = ids[:QUESTION_AT] + [DELIMITER] + ids[QUESTION_AT:]
    return torch.tensor([ids])


def load(folder: Path, architecture: str, dtype: str, eager: bool):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(folder / architecture, dtype=getattr(torch, dtype),
                                                 attn_implementation="eager" if eager else "sdpa")
    return model.eval()


def curve_npy(folder: Path, architecture: str) -> Path:
    """The shared LU-KV curve as the .npy our LUKVPress reads (kvpress's side gets the same numbers)."""
    import numpy as np

    path = folder / f"lukv-{architecture}.npy"
    if not path.exists():
        curve = json.loads((folder / f"lukv-{architecture}.json").read_text())
        np.save(path, np.array(curve, dtype=np.float32))
    return path


def cases():
    for architecture in ARCHITECTURES:
        for dtype in DTYPES:
            for ratio in RATIOS:
                yield architecture, dtype, ratio


def _key(name: str, architecture: str, dtype: str, ratio: float) -> str:
    return f"{name}|{architecture}|{dtype}|{ratio}"


def zeroed_channels_kept(cache, n_layers: int) -> list[list[list[int]]]:
    """Per layer and KV head, the key channels that are not zero at every position."""
    kept = []
    for layer in range(n_layers):
        keys = cache.layers[layer].keys[0]  # (kv_heads, k_len, head_dim)
        kept.append([torch.nonzero(~(head == 0).all(dim=0)).flatten().tolist() for head in keys])
    return kept


def our_side(folder: Path, names: list[str]) -> dict:
    from transformers import AutoTokenizer, DynamicCache

    from presses import build_press
    from presses.compat import model_cache_kwarg
    from presses.restorekv_press import local_folder

    results = {}
    for architecture, dtype, ratio in cases():
        for eager in (False, True):
            for name in names:
                if (name in EAGER) != eager:
                    continue
                model = load(folder, architecture, dtype, eager)  # fresh per press: no state leaks between them
                knob = "key_channel_compression_ratio" if name == "think" else "compression_ratio"
                extra = {"budget_curve": str(curve_npy(folder, architecture))} if name == "lukv" else {}
                if name.startswith("RestoreKV"):
                    extra["adapter"] = str(folder / architecture / local_folder(name.endswith("_plus")))
                press = build_press(name, **{knob: ratio}, **extra)
                tokenizer = None
                if name in TOKENIZER_PRESSES:
                    tokenizer = AutoTokenizer.from_pretrained(folder / architecture)
                if name == "finch":
                    press.delimiter_token_id = DELIMITER
                cache = DynamicCache(config=model.config)
                torch.manual_seed(SEED)
                with press(model, tokenizer), torch.no_grad():
                    model(input_ids=prompt_ids(folder, name), **{model_cache_kwarg(): cache})
                n_layers = model.config.num_hidden_layers
                if name == "think":
                    kept = zeroed_channels_kept(cache, n_layers)
                else:
                    # RestoreKV's masks also cover its restore tokens after the context: compare the context.
                    kept = [[torch.nonzero(~head[:CONTEXT_LENGTH]).flatten().tolist()
                             for head in press.evicted_mask(layer)[0]] for layer in range(n_layers)]
                results[_key(name, architecture, dtype, ratio)] = kept
                if name.startswith("RestoreKV"):
                    results[RESTORED + _key(name, architecture, dtype, ratio)] = restored_pairs(cache, n_layers)
    return results


def restored_pairs(cache, n_layers: int) -> list:
    """Per layer, the keys and values after the context: RestoreKV's restore tokens, encoded with its adapter."""
    return [[cache.layers[layer].keys[0, :, CONTEXT_LENGTH:].float().tolist(),
             cache.layers[layer].values[0, :, CONTEXT_LENGTH:].float().tolist()] for layer in range(n_layers)]


def kvpress_side(folder: Path, names: list[str]) -> dict:
    """Runs under the side environment: imports kvpress, never this project's packages."""
    import kvpress
    import kvpress.presses.restorekv_press as restorekv
    from transformers import DynamicCache

    namespace = {name: getattr(kvpress, name) for name in dir(kvpress) if name.endswith("Press")}
    ids = prompt_ids(folder, "")
    results = {}
    for architecture, dtype, ratio in cases():
        for eager in (False, True):
            for name in names:
                if (name in EAGER) != eager:
                    continue
                # A fresh model per press: kvpress presses leave attributes on modules (masked_key_indices, ...).
                model = load(folder, architecture, dtype, eager)
                n_layers = model.config.num_hidden_layers
                reference = DynamicCache()
                with torch.no_grad():
                    model(input_ids=ids, past_key_values=reference)
                curve = json.loads((folder / f"lukv-{architecture}.json").read_text())

                def with_curve(press, curve=curve):
                    import numpy as np

                    press._budget_curves = np.array(curve, dtype=np.float32)  # kvpress would download its own
                    return press

                def with_delimiter(press):
                    press.delimiter_token_id = DELIMITER  # what update_model_and_tokenizer would set
                    return press

                def with_adapter(press, model=model, architecture=architecture):
                    # The adapter saved beside the model instead of higokri/RestoreKV-<model>, loaded with peft.
                    adapter = folder / architecture / ("restorekv_plus" if press.kvzip_plus_normalization
                                                       else "restorekv")
                    restorekv.hf_hub_download = lambda repo, filename: str(adapter / filename)
                    model.load_adapter(str(adapter), adapter_name=press.adapter_name)
                    return press

                constructors = dict(namespace, r=ratio, with_curve=with_curve, with_delimiter=with_delimiter,
                                    with_adapter=with_adapter)
                press = eval(KVPRESS_CONSTRUCTORS[name], constructors)  # noqa: S307
                cache = DynamicCache()
                torch.manual_seed(SEED)
                # KVzip's family scores and evicts when its context closes, after the forward.
                with press(model), torch.no_grad():
                    model(input_ids=prompt_ids(folder, name), past_key_values=cache)
                if name == "think":
                    results[_key(name, architecture, dtype, ratio)] = zeroed_channels_kept(cache, n_layers)
                    continue
                kept = []
                for layer in range(n_layers):
                    keys, full = cache.layers[layer].keys[0], reference.layers[layer].keys[0]
                    masked = getattr(model.model.layers[layer].self_attn, "masked_key_indices", None)
                    heads = []
                    for head in range(full.shape[0]):
                        if masked is not None or keys.shape[1] == full.shape[1]:  # masking press or no eviction
                            removed = set()
                            if masked is not None:
                                _, head_idx, seq_idx = masked
                                removed = set(seq_idx[head_idx == head].tolist())
                            heads.append(sorted(set(range(full.shape[1])) - removed))
                        else:
                            # Nearest row, not equal rows: a press that prefills with eager attention
                            # (KVCompose) gets keys that differ from the sdpa reference by rounding after layer 0.
                            distances = torch.cdist(keys[head].float(), full[head].float())
                            heads.append(sorted(distances.argmin(dim=-1).tolist()))
                    kept.append(heads)
                results[_key(name, architecture, dtype, ratio)] = kept
                if name.startswith("RestoreKV"):
                    results[RESTORED + _key(name, architecture, dtype, ratio)] = restored_pairs(cache, n_layers)
    return results


def compare_restored(ours: dict, theirs: dict) -> list[str]:
    """One line per RestoreKV case: the largest |difference| of the restore tokens' keys and values (kvpress encodes
    them through peft's LoRA layers, this side through forward hooks on the same safetensors)."""
    lines = []
    for key in (k for k in ours if k.startswith(RESTORED)):
        ours_t, theirs_t = torch.tensor(ours[key]), torch.tensor(theirs[key])
        diff = float((ours_t - theirs_t).abs().max())
        lines.append(f"- {key[len(RESTORED):].replace('|', ' ')}: max |difference| {diff:.2e} "
                     f"(largest entry {float(theirs_t.abs().max()):.2f})")
    return lines


def compare(ours: dict, theirs: dict) -> list[dict]:
    rows = []
    for key in ours:
        if key.startswith(RESTORED):
            continue
        name, architecture, dtype, ratio = key.split("|")
        identical, jaccards = [], []
        for our_layer, their_layer in zip(ours[key], theirs[key], strict=True):
            for a, b in zip(our_layer, their_layer, strict=True):
                a, b = set(a), set(b)
                identical.append(a == b)
                jaccards.append(len(a & b) / len(a | b) if a | b else 1.0)
        rows.append({"press": name, "architecture": architecture, "dtype": dtype, "ratio": float(ratio),
                     "identical": sum(identical) / len(identical), "jaccard": sum(jaccards) / len(jaccards)})
    return rows


def markdown(rows: list[dict]) -> str:
    """One line per press and (architecture, dtype); per ratio: identical share / mean Jaccard."""
    header = "| press | model | dtype | " + " | ".join(f"r={r}" for r in RATIOS) + " |"
    lines = [header, "|---|---|---|" + "---|" * len(RATIOS)]
    cells = {(r["press"], r["architecture"], r["dtype"], r["ratio"]): r for r in rows}
    for name in dict.fromkeys(r["press"] for r in rows):
        for architecture in ARCHITECTURES:
            for dtype in DTYPES:
                parts = []
                for ratio in RATIOS:
                    row = cells[(name, architecture, dtype, ratio)]
                    parts.append(f"{row['identical']:.0%} / {row['jaccard']:.3f}")
                lines.append(f"| {name} | {architecture} | {dtype} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", choices=("ours", "kvpress"), default="ours")
    parser.add_argument("--kvpress_python", default="/work/kvpress-venv/bin/python",
                        help="python of the side environment with kvpress 0.5.5")
    parser.add_argument("--work_dir", default=None, help="folder for models, inputs and kept sets (default: temp)")
    parser.add_argument("--presses", default=",".join(KVPRESS_CONSTRUCTORS), help="comma-separated names")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.presses.split(",") if name.strip()]
    unknown = sorted(set(names) - set(KVPRESS_CONSTRUCTORS))
    if unknown:
        parser.error(f"no kvpress constructor for {', '.join(unknown)}: choose from {', '.join(KVPRESS_CONSTRUCTORS)}")
    if args.side == "kvpress":
        folder = Path(args.work_dir)
        (folder / "kvpress.json").write_text(json.dumps(kvpress_side(folder, names)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.work_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        write_inputs(folder)
        # Run the side environment first: it needs only the files written above.
        subprocess.run([args.kvpress_python, str(Path(__file__).resolve()), "--side", "kvpress", "--work_dir",
                        str(folder), "--presses", ",".join(names)], check=True)
        ours = our_side(folder, names)
        theirs = json.loads((folder / "kvpress.json").read_text())
        rows = compare(ours, theirs)
        restored = compare_restored(ours, theirs)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    if restored:
        print("\nRestoreKV restore tokens, keys and values after the context, here vs kvpress (peft):")
        print("\n".join(restored))


if __name__ == "__main__":
    sys.exit(main())
