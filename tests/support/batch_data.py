"""Inputs and readers for batch-job tests: 32 x 32 shapes pictures the toy model knows, manifests, results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ip2p_nodes.pipeline_core.models.assets import toy_model_path

INSTRUCTIONS = ("make the circle red", "remove the star", "make the square blue", "add a green triangle")
# The toy model by its file (not the alias: the alias would also pick its guidance) at 2 steps: a row costs
# a fraction of a second, and what is under test is the job, not the picture.
TOY_ARGS = ("--model", str(toy_model_path()), "--steps", "2", "--text-guidance", "3")


def write_pictures(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from ip2p_nodes.pipeline_core.training import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, t in enumerate(synthetic.triplets(n, seed=seed, size=32)):
        path = folder / f"pic{i:02d}.png"
        Image.fromarray((np.asarray(t.input) * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mixed_rows(pictures: list[Path], n: int, base: Path) -> list[dict]:
    """``n`` rows over ``pictures`` with mixed instructions, seeds and (every fifth row) image guidance."""
    rows = []
    for i in range(n):
        row = {"image": str(pictures[i % len(pictures)].relative_to(base)),
               "instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)], "seed": 1000 + 7 * i}
        if i % 5 == 4:
            row["image_guidance"] = 1.2
        rows.append(row)
    return rows


def triplets(out: Path, name: str = "triplets.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def filtered(out: Path) -> list[dict]:
    """The rows ``--filter-clip`` left out of triplets.jsonl (none when it wrote no filtered.jsonl)."""
    return triplets(out, "filtered.jsonl") if (out / "filtered.jsonl").is_file() else []


def results(out: Path) -> dict[str, bytes]:
    """key -> the edited picture's bytes, for every row of the manifest."""
    return {r["key"]: (out / r["edited"]).read_bytes() for r in triplets(out)}
