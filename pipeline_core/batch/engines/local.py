"""The local engine: every task in this process, one after another, with one model load for the whole job."""

from __future__ import annotations

from typing import Callable, Iterable

from ..work import JobSpec, Outcome, Task, edit_task, load_model


def run(spec: JobSpec, tasks: Iterable[Task], on_outcome: Callable[[Outcome], None], cache=None,
        threads: int | None = None) -> None:
    """Edit ``tasks`` in order, handing each outcome to ``on_outcome`` as soon as it is ready.

    ``threads``: torch's CPU threads for the job (None: as they are), restored afterwards.
    """
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = load_model(spec, cache)
        for task in tasks:
            on_outcome(edit_task(model, spec, task))
    finally:
        torch.set_num_threads(before)
