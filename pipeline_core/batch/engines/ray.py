"""The Ray engine: Ray Data streams the tasks through a pool of actors that each hold one loaded model.

``ray.data.from_items(tasks)`` → ``map_batches(EditActor, compute=ActorPoolStrategy(size=N))`` → the driver
iterates the results and commits each one. The shape is Ray Data's batch inference pattern (a callable class
whose constructor loads the model once, in a fixed pool of N actors; ``num_gpus=1`` gives each actor its own GPU,
with ``CUDA_VISIBLE_DEVICES`` set by Ray, so every actor runs on ``cuda``).

- One task per block: Ray Data hands a block's outputs back when the block is done, so one row a block is what
  lets the driver commit each picture as soon as it exists (a crash then loses at most the rows in flight).
- Actors hand back PNG bytes, never write files: the output folder needs to exist only where the job was
  started. Input pictures, masks and the model are read by the actors, so on a cluster they must be at the same
  path on every machine (a shared or synced folder), and the pack installed on every machine.
- A worker that dies is restarted by Ray Data and its task retried (its actors run with ``max_restarts=-1``,
  ``max_task_retries=-1``); the driver ignores a second result for a row it has already committed.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Iterable

from ...errors import InputError
from ..work import JobSpec, Outcome, Task, edit_task, load_model

log = logging.getLogger(__name__)

INSTALL_HINT = 'install it with: pip install "ip2p-nodes[ray]"'


def require_ray():
    """The ``ray`` module with Ray Data, or an :class:`InputError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the part the engine uses)
    except ImportError as exc:
        raise InputError(f"--engine ray needs Ray with Ray Data ({exc}); {INSTALL_HINT}") from None
    return ray


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (``auto``: the one ``ray start`` runs here), or start a local Ray when
    ``address`` is None; True if this call started Ray (so the job shuts it down again)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    try:
        # A Ray started here is for this job alone: no dashboard (a web server, and a port, nobody asked for).
        extra = {"include_dashboard": False} if address is None else {}
        ray.init(address=address, logging_level=logging.WARNING, **extra)
    except ConnectionError as exc:
        raise InputError(f"--address {address}: cannot reach a Ray cluster there ({exc}); start one with "
                         "`ray start --head` and pass the address it prints") from None
    return True


def cluster_gpus() -> int:
    return int(require_ray().cluster_resources().get("GPU", 0))


def default_workers(gpu: bool, threads: int) -> int:
    """One worker per GPU, or as many CPU workers as the cluster's CPUs allow."""
    resources = require_ray().cluster_resources()
    if gpu:
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1) // threads))


class EditActor:
    """Holds one loaded model; edits one row per call (a one-row pyarrow table in, one row out)."""

    def __init__(self, spec: JobSpec, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)  # as many threads as CPUs Ray reserved for this actor, no more
        self.spec = spec
        self.model = load_model(spec)

    def __call__(self, batch):
        import pyarrow as pa

        outcomes, pictures = [], []
        for text in batch.column("task").to_pylist():
            outcome = edit_task(self.model, self.spec, Task(**json.loads(text)))
            pictures.append(outcome.png)
            outcomes.append(json.dumps({"number": outcome.number, "key": outcome.key, "error": outcome.error,
                                        "text_guidance": outcome.text_guidance,
                                        "image_guidance": outcome.image_guidance}))
        return pa.table({"outcome": pa.array(outcomes, pa.string()), "png": pa.array(pictures, pa.binary())})


def run(spec: JobSpec, tasks: Iterable[Task], on_outcome: Callable[[Outcome], None], workers: int | None = None,
        address: str | None = None, threads: int = 1) -> None:
    """Edit ``tasks`` on Ray (a local instance, or the cluster at ``address``), handing back outcomes as they come."""
    ray = require_ray()
    tasks = list(tasks)
    started = connect(address)
    try:
        gpu = spec.device.startswith("cuda")
        workers = workers or default_workers(gpu, threads)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the job's own bar counts committed pictures, with an ETA
        items = [{"task": json.dumps(t.to_json())} for t in tasks]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            EditActor, fn_constructor_kwargs={"spec": spec, "threads": threads}, batch_size=1,
            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads,
            num_gpus=1 if gpu else 0,
        )
        log.info("batch: %d rows on Ray, %d %s workers", len(tasks), workers, "GPU" if gpu else "CPU")
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for text, png in zip(table.column("outcome").to_pylist(), table.column("png").to_pylist()):
                on_outcome(Outcome(png=png, **json.loads(text)))
    finally:
        if started:
            ray.shutdown()
