"""How fast a sweep runs, three ways side by side: ``python -m evaluation.benchmarks.sweep_speed``.

The sweep: knorm, snapkv and streaming_llm at compression ratios 0.25/0.5/0.75/0.9 over the same 12 RULER samples
(6 tasks x 2, 1,024 tokens, generated for the embedded model kvtiny and written to one local file), greedy. Timed:

- **engine**: kvpress-eval's sweep engine (``--engine batched``);
- **sequential**: kvpress-eval one context and one run at a time (``--engine sequential``);
- **kvpress**: kvpress 0.5.5's ``kv-press-text-generation`` pipeline, one sample and one press at a time, as its
  evaluation CLI runs them, when a side environment has it (``--kvpress_python``).

``--batch_sizes 1,8,32`` also times the engine at each batch size and counts greedy predictions that differ.

In-process times load the model once, outside the timed part; the three sides run interleaved ``--repeats`` times
and the best time of each is kept (the machine is shared). Whole-process times (``--whole_process``) run each side
as a fresh command, model loading included. Printed: the times, the ratios engine/kvpress and engine/sequential,
and the share of identical predictions (engine vs sequential, engine vs kvpress).

The side environment is a measuring tool, never a dependency (kvpress 0.5.5 pins transformers < 5.3)::

    python -m venv /tmp/kvpress-venv
    /tmp/kvpress-venv/bin/pip install torch==2.13.0 && /tmp/kvpress-venv/bin/pip install kvpress==0.5.5
    python -m evaluation.benchmarks.sweep_speed --kvpress_python /tmp/kvpress-venv/bin/python
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import torch

from evaluation.config import resolve_config
from evaluation.datasets.registry import load_records
from evaluation.models import load_model, resolve_model_path
from evaluation.runner import run_cells, sweep_grid

PRESSES = ["knorm", "snapkv", "streaming_llm"]
RATIOS = [0.25, 0.5, 0.75, 0.9]

# Runs in the side environment (kvpress + its own transformers); reads the samples, prints one JSON line.
KVPRESS_SIDE = r'''
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
import kvpress
from kvpress import KnormPress, SnapKVPress, StreamingLLMPress

model_dir, samples_file, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
samples = [json.loads(line) for line in open(samples_file)]
presses = {"knorm": KnormPress, "snapkv": SnapKVPress, "streaming_llm": StreamingLLMPress}
ratios = [0.25, 0.5, 0.75, 0.9]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
start = time.perf_counter()
predictions = {}
for name, press_class in presses.items():
    for ratio in ratios:
        press = press_class(compression_ratio=ratio)
        for sample in samples:
            output = pipe(sample["context"], question=sample["question"], answer_prefix=sample["answer_prefix"],
                          press=press, max_new_tokens=sample["max_new_tokens"])
            predictions[f"{name}|{ratio}|{sample['sample_id']}"] = output["answer"]
print(json.dumps({"seconds": time.perf_counter() - start, "predictions": predictions}))
'''


def write_samples(path: Path, samples: int) -> None:
    """12 RULER samples (6 tasks x 2) at 1,024 tokens for kvtiny's tokenizer, in the common local-file layout."""
    _, tokenizer = load_model("kvtiny", "cpu", "float32", "sdpa")
    config = resolve_config(ruler_length=1024, max_samples=max(1, samples // 6))
    records = load_records("ruler", config, tokenizer)[:samples]
    with path.open("w") as file:
        for record in records:
            file.write(json.dumps({key: record[key] for key in
                                   ("sample_id", "context", "question", "answer_prefix", "answer", "task",
                                    "max_new_tokens")}) + "\n")


def sweep_flags(samples_file: Path, output_dir: Path, engine: str, kv_storage: str = "compact") -> dict:
    return {"press": PRESSES, "compression_ratio": RATIOS, "dataset": ["ruler"],
            "data_files": {"ruler": str(samples_file)}, "max_samples": 100, "device": "cpu", "dtype": "float32",
            "engine": engine, "output_dir": str(output_dir), "kv_storage": kv_storage}


def ours(model, tokenizer, samples_file: Path, output_dir: Path, engine: str,
         batch_size: int | None = None, kv_storage: str = "compact") -> tuple[float, dict]:
    """Seconds and {press|ratio|sample_id: prediction} of one in-process sweep into an empty folder."""
    config = resolve_config(**sweep_flags(samples_file, output_dir, engine, kv_storage), batch_size=batch_size)
    grid = sweep_grid(config)
    start = time.perf_counter()
    results = run_cells(model, tokenizer, config, grid)
    seconds = time.perf_counter() - start
    predictions = {}
    for result in results:
        for line in (result.folder / "predictions.jsonl").read_text().splitlines():
            row = json.loads(line)
            predictions[f"{result.spec.press}|{result.spec.value}|{row['sample_id']}"] = row["prediction"]
    return seconds, predictions


def theirs(kvpress_python: str, samples_file: Path, threads: int) -> tuple[float, dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(KVPRESS_SIDE)
    process = subprocess.run([kvpress_python, script.name, str(resolve_model_path("kvtiny")), str(samples_file),
                              str(threads)], capture_output=True, text=True, env={**os.environ,
                                                                                  "HF_HUB_OFFLINE": "1"})
    os.unlink(script.name)
    if process.returncode != 0:
        raise SystemExit(f"the kvpress side failed: {process.stderr.strip().splitlines()[-1]}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    return result["seconds"], result["predictions"]


def identical(a: dict, b: dict) -> tuple[int, int]:
    keys = sorted(set(a) & set(b))
    return sum(a[k].strip() == b[k].strip() for k in keys), len(keys)


def whole_process(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def main(samples: int = 12, repeats: int = 2, threads: int = 1, kvpress_python: str | None = None,
         whole_process_times: bool = True, batch_sizes: str | tuple | None = None) -> None:
    """``batch_sizes`` (e.g. 1,8,32,64): also time the engine at each batch size and count the greedy predictions
    that differ from the first one's."""
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="sweep-speed-"))
    samples_file = work / "ruler_12.jsonl"
    write_samples(samples_file, samples)
    model, tokenizer = load_model("kvtiny", "cpu", "float32", "sdpa")
    best: dict[str, float] = {}
    predictions: dict[str, dict] = {}
    for repeat in range(repeats):
        for side in ("engine", "sequential", "kvpress"):
            if side == "kvpress":
                if kvpress_python is None:
                    continue
                seconds, predicted = theirs(kvpress_python, samples_file, threads)
            else:
                engine = "sequential" if side == "sequential" else "batched"
                seconds, predicted = ours(model, tokenizer, samples_file, work / f"{side}-{repeat}", engine)
            best[side] = min(best.get(side, float("inf")), seconds)
            predictions[side] = predicted
            print(f"repeat {repeat}: {side:<10} {seconds:7.2f} s", flush=True)
    n = len(predictions["engine"])
    print(f"\nsweep: {len(PRESSES)} presses x {len(RATIOS)} ratios x {samples} samples = {n} answers, kvtiny, "
          f"RULER 1k, greedy, {threads} torch thread(s); best of {repeats}, in-process")
    for side, seconds in best.items():
        print(f"  {side:<10} {seconds:7.2f} s")
    same, total = identical(predictions["engine"], predictions["sequential"])
    print(f"engine/sequential = {best['engine'] / best['sequential']:.3f}; identical predictions {same}/{total}")
    if "kvpress" in best:
        same, total = identical(predictions["engine"], predictions["kvpress"])
        print(f"engine/kvpress    = {best['engine'] / best['kvpress']:.3f}; identical predictions {same}/{total}")
        same, total = identical(predictions["sequential"], predictions["kvpress"])
        print(f"(sequential vs kvpress: identical predictions {same}/{total})")
    if batch_sizes:
        sizes = [int(size) for size in (batch_sizes.split(",") if isinstance(batch_sizes, str) else batch_sizes)]
        by_size = {}
        for size in sizes:
            seconds, by_size[size] = ours(model, tokenizer, samples_file, work / f"batch-{size}", "batched", size)
            same, total = identical(by_size[sizes[0]], by_size[size])
            print(f"batch size {size:>3}: {seconds:6.2f} s; predictions identical to batch size {sizes[0]}: "
                  f"{same}/{total}", flush=True)
    if whole_process_times:
        env_threads = ["env", f"OMP_NUM_THREADS={threads}"]
        times = {}
        for engine in ("batched", "sequential"):
            flags = sweep_flags(samples_file, work / f"whole-{engine}", engine)
            command = [*env_threads, sys.executable, "-m", "evaluation.cli", "--press", ",".join(PRESSES),
                       "--compression_ratio", ",".join(map(str, RATIOS)), "--data_files", str(samples_file),
                       "--max_samples", "100", "--device", "cpu", "--dtype", "float32", "--engine", engine,
                       "--output_dir", flags["output_dir"]]
            times[engine] = whole_process(command)
        if kvpress_python is not None:
            with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
                script.write(KVPRESS_SIDE)
            times["kvpress"] = whole_process([*env_threads, kvpress_python, script.name,
                                              str(resolve_model_path("kvtiny")), str(samples_file), str(threads)])
            os.unlink(script.name)
        print("whole process (model loading included): " +
              ", ".join(f"{side} {seconds:.1f} s" for side, seconds in times.items()))


if __name__ == "__main__":
    fire.Fire(main)
