"""Kept sets of duo_attention, qfilter and fastkvzip against kvpress, given the same artifacts.

``python -m evaluation.benchmarks.kvpress_parity_artifacts --kvpress_python /work/kvpress-venv/bin/python``

Writes a tiny random Qwen3 model, random token ids and one artifact per press in its published layout to a temporary
folder; runs our presses here and kvpress's in a subprocess with the given interpreter (kvpress installed there), its
loaders pointed at the local artifact files instead of the hub; prints the fraction of (layer, head, position)
decisions that agree. kvpress's eviction is read from ``module.masked_key_indices`` (DuoAttention, Fast KVzip) and,
for its top-k Q-Filter press, from the scores it computes (``n_kept = int(k_len * (1 - ratio))``, as here at 120
tokens).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import fire
import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from presses import DuoAttentionPress, FastKVzipPress, QFilterPress
from presses.compat import model_cache_kwarg
from presses.duo_attention_press import DuoPatterns, save_patterns
from presses.fastkvzip_press import FastKVzipGate, save_gates
from presses.qfilter_press import save_qfilters

KVPRESS_SIDE = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from transformers import AutoModelForCausalLM
    import kvpress.presses.fastkvzip_press as fast
    from kvpress import DuoAttentionPress, FastKVzipPress, QFilterPress
    from kvpress.presses.qfilter_press import QFilters

    folder = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(folder + "/model", attn_implementation="sdpa").eval()
    ids = torch.load(folder + "/ids.pt")
    n = ids.shape[1]

    def masked(model):
        masks = []
        for layer in model.model.layers:
            mask = torch.zeros(1, model.config.num_key_value_heads, n, dtype=torch.bool)
            if getattr(layer.self_attn, "masked_key_indices", None) is not None:
                mask[layer.self_attn.masked_key_indices] = True
            layer.self_attn.masked_key_indices = None
            masks.append(mask)
        return torch.stack(masks)

    def duo_pattern(model):
        config = json.load(open(folder + "/duo/config.json"))
        scores = np.clip(np.loadtxt(folder + "/duo/full_attention_heads.tsv", dtype=float, delimiter="\\t"), 0, 1)
        return config["sink_size"], config["recent_size"], scores

    out = {}
    DuoAttentionPress.load_attention_pattern = staticmethod(duo_pattern)
    with DuoAttentionPress(head_compression_ratio=0.5)(model), torch.no_grad():
        model(ids)
    out["duo_attention"] = masked(model)

    QFilterPress.load_q_filters = staticmethod(lambda name: QFilters.from_pretrained(folder + "/qfilters").q_filters)
    press = QFilterPress(compression_ratio=0.5)
    scores = {}
    original = press.score
    def score(module, *args):
        result = original(module, *args)
        scores[module.layer_idx] = result
        return result
    press.score = score
    with press(model), torch.no_grad():
        model(ids)
    kept = [s.topk(int(n * 0.5), dim=-1).indices for _, s in sorted(scores.items())]
    out["qfilter"] = torch.stack([torch.ones_like(s, dtype=torch.bool).scatter_(-1, k, False)
                                  for (_, s), k in zip(sorted(scores.items()), kept)])

    fast.get_gate_weight = lambda name: (torch.load(folder + "/gates.pt")["module"], "x/q2_dim16_sink16.pt")
    with FastKVzipPress(compression_ratio=0.5)(model), torch.no_grad():
        model(ids)
    out["fastkvzip"] = masked(model)
    torch.save(out, folder + "/kvpress.pt")
''')


def ours(model: Qwen3ForCausalLM, ids: torch.Tensor, folder: Path) -> dict[str, torch.Tensor]:
    presses = {"duo_attention": DuoAttentionPress(head_compression_ratio=0.5, patterns=str(folder / "duo")),
               "qfilter": QFilterPress(compression_ratio=0.5, q_filters_path=str(folder / "qfilters")),
               "fastkvzip": FastKVzipPress(compression_ratio=0.5, gates_path=str(folder / "q2_dim16_sink16.pt"))}
    masks = {}
    for name, press in presses.items():
        with press(model), torch.no_grad():
            model(input_ids=ids, **{model_cache_kwarg(): DynamicCache(config=model.config)}, use_cache=True)
        masks[name] = torch.stack([press.evicted_mask(i) for i in range(model.config.num_hidden_layers)])
    return masks


def main(kvpress_python: str = "/work/kvpress-venv/bin/python", n: int = 120, seed: int = 0) -> None:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    model = Qwen3ForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, n))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model.save_pretrained(str(folder / "model"))
        torch.save(ids, folder / "ids.pt")
        save_patterns(folder / "duo", DuoPatterns(8, 16, torch.rand(2, 2)))
        save_qfilters(folder / "qfilters", torch.randn(2, 2, 16))
        gates = [FastKVzipGate(64, 16, 2, 2, 16) for _ in range(2)]
        for gate in gates:  # published gates are trained; random ones exercise every parameter
            for parameter in gate.parameters():
                torch.nn.init.normal_(parameter, std=0.5)
        save_gates(folder / "gates.pt", gates)
        save_gates(folder / "q2_dim16_sink16.pt", gates)
        model.name_or_path = str(folder / "model")
        ours_masks = ours(model, ids, folder)
        (folder / "side.py").write_text(KVPRESS_SIDE)
        result = subprocess.run([kvpress_python, str(folder / "side.py"), str(folder)], capture_output=True,
                                text=True, timeout=600)
        if result.returncode != 0:
            sys.exit(f"kvpress side failed: {result.stderr.strip().splitlines()[-1]}")
        theirs = torch.load(folder / "kvpress.pt")
    report = {name: float((ours_masks[name] == theirs[name]).float().mean()) for name in ours_masks}
    print(json.dumps({"agreement": report, "evicted_ours": {k: float(v.float().mean()) for k, v in
                                                            ours_masks.items()},
                      "evicted_kvpress": {k: float(v.float().mean()) for k, v in theirs.items()}}, indent=2))


if __name__ == "__main__":
    fire.Fire(main)
