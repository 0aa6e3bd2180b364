"""Pictures per second of a batch job: the local engine against Ray with N workers, on the embedded toy model.

    python benchmarks/batch.py --rows 48 --steps 10 --workers 2

A figure, not a test. Each engine edits the same rows into a fresh folder; printed per engine: the whole job's
rate (model loads and Ray's start-up included) and the steady rate (from the first picture to the last, the
figure that matters for a long job). Ray runs on a local instance of ``--workers`` CPUs, one thread a worker;
the local engine runs once with torch's default threads and once with one thread (a single worker's speed).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared test support package

from ip2p_nodes.pipeline_core import limits  # noqa: E402
from ip2p_nodes.pipeline_core.batch.engines import local as local_engine  # noqa: E402
from ip2p_nodes.pipeline_core.batch.job import run_job  # noqa: E402
from ip2p_nodes.pipeline_core.batch.rows import read_rows  # noqa: E402
from ip2p_nodes.pipeline_core.batch.work import JobSpec  # noqa: E402
from ip2p_nodes.pipeline_core.editing.settings import EditSettings  # noqa: E402
from ip2p_nodes.pipeline_core.models.assets import TOY_TEXT_GUIDANCE, toy_model_path  # noqa: E402
from ip2p_nodes.pipeline_core.models.loading import ModelSource  # noqa: E402
from support.batch_data import mixed_rows, write_manifest, write_pictures  # noqa: E402


def measure(name: str, rows, spec: JobSpec, out: Path, engine) -> tuple[float, float]:
    stamps: list[float] = []

    def timed(spec, tasks, on_outcome):
        def note(outcome):
            stamps.append(time.perf_counter())
            on_outcome(outcome)

        engine(spec, tasks, note)

    start = time.perf_counter()
    summary = run_job(rows, spec, out, timed, progress=False)
    total = time.perf_counter() - start
    assert not summary.failed, summary.failed
    n = len(summary.edited)
    whole = n / total
    steady = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else float("nan")
    print(f"{name:<28} {n:4d} pictures  {total:7.1f} s  whole job {whole:6.2f} pictures/s  steady {steady:6.2f}")
    return whole, steady


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pictures = write_pictures(tmp / "in", 8)
        rows = read_rows(str(write_manifest(tmp / "rows.jsonl", mixed_rows(pictures, args.rows, tmp))))
        spec = JobSpec(ModelSource("single_file", str(toy_model_path())), "fp32", "cpu",
                       EditSettings(steps=args.steps).checked(), (TOY_TEXT_GUIDANCE, limits.IMAGE_GUIDANCE.default))
        print(f"toy model, 32x32, {args.steps} steps, {args.rows} rows")
        local_all = measure("local (default threads)", rows, spec, tmp / "local",
                            lambda s, t, o: local_engine.run(s, t, o))
        local_one = measure("local (1 thread)", rows, spec, tmp / "local1",
                            lambda s, t, o: local_engine.run(s, t, o, threads=1))

        import ray

        from ip2p_nodes.pipeline_core.batch.engines import ray as ray_engine

        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
        try:
            remote = measure(f"ray ({args.workers} workers x 1 thread)", rows, spec, tmp / "ray",
                             lambda s, t, o: ray_engine.run(s, t, o, workers=args.workers, threads=1))
        finally:
            ray.shutdown()
        print(f"ray / local steady: {remote[1] / local_all[1]:.2f}x (default threads), "
              f"{remote[1] / local_one[1]:.2f}x (1 thread)")


if __name__ == "__main__":
    main()
