"""Where a sweep's cells run: in this process (``--executor local``) or on a Ray cluster (``--executor ray``), and
which of them (``--shard i/n``).

The plan (grid, shard, checks) is made here, before any model loads; the execution of a list of cells with a loaded
model is :func:`evaluation.runner.run_cells`, the same for every executor. Results land in run folders named by their
run id, so where a cell ran never changes what is written: a Ray worker, a SLURM array task and a local run of the
same cell write the same files, and a retried cell resumes from its predictions cache.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch

from evaluation.cache import CacheError
from evaluation.config import (
    ConfigError,
    EvalConfig,
    check_writable_folder,
    default_num_threads,
    parse_shard,
)
from evaluation.models import check_attn_implementation, check_device, check_model, load_model
from evaluation.runner import RunResult, RunSpec, run_cells, sweep_grid
from presses import PressError

logger = logging.getLogger("kvpress-eval")
MAX_ATTEMPTS = 3  # a chunk of cells whose worker died is run again this many times in all


def shard_cells(grid: list[RunSpec], index: int, count: int) -> list[RunSpec]:
    """Shard ``index`` of ``count``: every ``count``-th cell of the grid from ``index`` on. The grid's order is a
    function of the settings alone, so shards run with the same settings are disjoint and together the whole sweep."""
    return grid[index::count]


def plan(config: EvalConfig) -> list[RunSpec]:
    """The cells this invocation runs, after every check that needs no model: presses, datasets, shard, model folder,
    output folder and, where the cells run on this machine, device and attention implementation."""
    grid = sweep_grid(config)
    shard = parse_shard(config.shard)
    specs = shard_cells(grid, *shard) if shard else grid
    check_writable_folder(config.output_dir)
    check_model(config.model)
    if config.executor == "ray":
        check_ray_address(config.ray_address)
        _import_ray()
    if config.executor == "local" or config.ray_address is None:  # a remote cluster's devices are not ours to see
        check_device(config.device)
        check_attn_implementation(config.attn_implementation, config.device)
    if shard:
        logger.info("shard %d/%d: %d of the sweep's %d cells", shard[0], shard[1], len(specs), len(grid))
    return specs


def set_threads(config: EvalConfig, workers_here: int = 1) -> int:
    """Set torch's CPU threads for this process (``--num_threads`` or :func:`default_num_threads`); returns it."""
    threads = config.num_threads or default_num_threads(workers_here)
    torch.set_num_threads(threads)
    return threads


def run_local(config: EvalConfig, specs: list[RunSpec]) -> list[RunResult]:
    """Every cell in this process, with one model load."""
    if not specs:
        logger.info("no cells to run (this shard is empty)")
        return []
    threads = set_threads(config)
    logger.info("loading %s (%d CPU thread%s)", config.model, threads, "s" if threads > 1 else "")
    model, tokenizer = load_model(config.model, config.device, config.dtype, config.attn_implementation)
    return run_cells(model, tokenizer, config, specs)


class CellWorker:
    """A Ray actor: loads the model once, then runs the chunks of cells it is handed (``ray.remote`` wraps it)."""

    def __init__(self, config: EvalConfig, threads: int) -> None:
        from transformers.utils import logging as transformers_logging

        torch.set_num_threads(threads)
        os.environ["TQDM_DISABLE"] = "1"  # per-context bars from many workers would interleave; the driver reports
        transformers_logging.disable_progress_bar()
        logging.basicConfig(level=logging.INFO, format="kvpress-eval worker: %(message)s")
        self.config = config
        self.model, self.tokenizer = load_model(config.model, config.device, config.dtype,
                                                config.attn_implementation)

    def run_chunk(self, specs: list[RunSpec]) -> list[RunResult]:
        return run_cells(self.model, self.tokenizer, self.config, specs)


def chunks(specs: list[RunSpec], workers: int) -> list[list[RunSpec]]:
    """The units of work handed to workers: a dataset's cells dealt into at most ``workers`` chunks, so a worker runs
    cells that share contexts together (the sweep engine prefills a context once for them)."""
    by_dataset: dict[str, list[RunSpec]] = {}
    for spec in specs:
        by_dataset.setdefault(spec.dataset, []).append(spec)
    work = []
    for cells in by_dataset.values():
        n = min(workers, len(cells))
        work.extend(cells[i::n] for i in range(n))
    return work


def run_ray(config: EvalConfig, specs: list[RunSpec]) -> list[RunResult]:
    """The cells spread over a Ray cluster (``--ray_address``, else a local one): one actor per GPU (or per
    ``--num_threads`` CPUs), each loading the model once. A chunk whose worker dies is run again on a fresh worker,
    up to :data:`MAX_ATTEMPTS` times in all; its predictions cache makes the retry a resume."""
    ray = _import_ray()
    if not specs:
        logger.info("no cells to run (this shard is empty)")
        return []
    started_here = not ray.is_initialized()
    if started_here:
        connect_ray(ray, config.ray_address)
    try:
        return _run_on_cluster(ray, config, specs)
    finally:
        if started_here:
            ray.shutdown()


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must accept connections: Ray itself would retry for minutes.
    ``auto`` and None are left to Ray (a running local cluster, or a new one)."""
    if address is None or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray_address takes auto, HOST:PORT or ray://HOST:PORT (e.g. 10.0.0.1:6379), got "
                          f"'{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ConfigError(f"--ray_address {address}: nothing answers there ({error.strerror or error}): start the "
                          "cluster with 'ray start --head', or leave --ray_address out for a local one") from None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install -e '.[ray]' (or pip install ray)") from None
    return ray


def connect_ray(ray, address: str | None) -> None:
    """Join the cluster at ``address``, or start a local one whose workers import this copy of kvpress-eval."""
    root = str(Path(__file__).resolve().parent.parent)
    runtime_env = None
    if address is None:
        runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH"))
                                                                  if p)}}
    try:
        ray.init(address=address, runtime_env=runtime_env, include_dashboard=False, log_to_driver=True,
                 logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError(f"--ray_address {address}: cannot join a Ray cluster there "
                          f"({str(error).splitlines()[0][:100]}): start one with 'ray start --head' or leave "
                          "--ray_address out for a local one") from None


def _run_on_cluster(ray, config: EvalConfig, specs: list[RunSpec]) -> list[RunResult]:
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    threads = config.num_threads or (1 if gpus else default_num_threads())
    workers = config.workers or (gpus if gpus else max(1, cpus // threads))
    work = chunks(specs, workers)
    workers = min(workers, len(work))
    options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": min(threads, cpus)}
    actor_class = ray.remote(**options)(CellWorker)
    logger.info("ray: %d cells in %d chunks on %d worker(s) (%s each)", len(specs), len(work), workers,
                "1 GPU" if gpus else f"{options['num_cpus']} CPU, {threads} thread(s)")

    def new_worker():
        return actor_class.remote(config, threads)

    idle = [new_worker() for _ in range(workers)]
    pending = list(enumerate(work))  # (chunk index, cells)
    attempts = dict.fromkeys(range(len(work)), 0)
    running: dict = {}  # object ref -> (chunk index, actor)
    results: dict[int, list[RunResult]] = {}
    cells_done, start = 0, time.monotonic()
    while pending or running:
        while pending and idle:
            index, cells = pending.pop(0)
            actor = idle.pop()
            attempts[index] += 1
            running[actor.run_chunk.remote(cells)] = (index, actor)
        ready, _ = ray.wait(list(running), num_returns=1)
        index, actor = running.pop(ready[0])
        try:
            results[index] = ray.get(ready[0])
        except ray.exceptions.RayActorError as error:
            _retry_or_fail(index, work[index], attempts[index], error)
            ray.kill(actor)
            pending.insert(0, (index, work[index]))
            idle.append(new_worker())
            continue
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, (ConfigError, PressError, CacheError)):
                raise ConfigError(str(cause)) from None
            raise
        idle.append(actor)
        cells_done += len(work[index])
        logger.info("ray: %d/%d cells done (%.0f s)", cells_done, len(specs), time.monotonic() - start)
    order = {spec: i for i, spec in enumerate(specs)}
    return sorted((r for chunk in results.values() for r in chunk), key=lambda r: order[r.spec])


def _retry_or_fail(index: int, cells: list[RunSpec], attempt: int, error: Exception) -> None:
    names = ", ".join(f"{s.dataset} {s.press}" + (f" {s.knob}={s.value}" if s.knob else "") for s in cells)
    if attempt >= MAX_ATTEMPTS:
        raise ConfigError(f"ray: the worker running {names} died {attempt} times "
                          f"({type(error).__name__}); rerun the same command to resume what is cached")
    logger.warning("ray: the worker running %s died (%s); retrying on a new worker (attempt %d of %d), resuming "
                   "from the cache", names, type(error).__name__, attempt + 1, MAX_ATTEMPTS)


EXECUTORS: dict[str, Callable[[EvalConfig, list[RunSpec]], list[RunResult]]] = {"local": run_local, "ray": run_ray}


def get_executor(name: str) -> Callable[[EvalConfig, list[RunSpec]], list[RunResult]]:
    if name not in EXECUTORS:
        raise ConfigError(f"--executor must be {' or '.join(EXECUTORS)}, got '{name}'")
    return EXECUTORS[name]


def run_sweep(config: EvalConfig) -> list[RunResult]:
    """Run the cells of the sweep (this shard's, with --shard) on the chosen executor, resuming what is cached;
    returns one result per cell. Everything is checked before a model loads."""
    specs = plan(config)
    return get_executor(config.executor)(config, specs)
