"""``ip2p-edit batch``: every row edited exactly once, resumable after a crash or a change, bad rows reported.

The toy model at 2 steps keeps a row to a fraction of a second; the Ray engine's tests are in test_batch_ray.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from ip2p_nodes.pipeline_core import ModelCache, cli
from ip2p_nodes.pipeline_core.batch.store import OutputStore
from ip2p_nodes.pipeline_core.errors import InputError
from support.batch_data import (
    INSTRUCTIONS,
    TOY_ARGS,
    filtered,
    mixed_rows,
    results,
    triplets,
    write_manifest,
    write_pictures,
)


@pytest.fixture
def loads(monkeypatch):
    """Counts the rows actually edited (each edit of a row encodes its picture once)."""
    from ip2p_nodes.pipeline_core.batch import work

    edited = []
    real = work._edit

    def counting(model, spec, task):
        edited.append(task.number)
        return real(model, spec, task)

    monkeypatch.setattr(work, "_edit", counting)
    return edited


def _batch(*args) -> int:
    return cli.main(["batch", *map(str, args), *TOY_ARGS])


def test_a_folder_with_an_instructions_file_gives_every_picture_each_edit_as_the_edit_command_would(tmp_path):
    pictures = write_pictures(tmp_path / "in", 2)
    (tmp_path / "todo.txt").write_text("# one a line\nmake the circle red\n\nremove the star\n")
    out = tmp_path / "out"

    assert _batch(tmp_path / "in", "--out", out, "--instructions", tmp_path / "todo.txt", "--seed", "5") == 0

    rows = triplets(out)
    assert [(r["input"], r["instruction"]) for r in rows] == [
        (f"../in/{p.name}", text) for p in pictures for text in ("make the circle red", "remove the star")
    ]
    assert all(r["seed"] == 5 and r["text_guidance"] == 3.0 and r["image_guidance"] == 1.5 for r in rows)
    # The same picture `ip2p-edit edit` makes with the same seed and settings, byte for byte.
    single = tmp_path / "single.png"
    assert cli.main(["edit", str(pictures[1]), "remove the star", "-o", str(single), "--seed", "5", *TOY_ARGS]) == 0
    assert np.array_equal(np.asarray(Image.open(out / rows[3]["edited"])), np.asarray(Image.open(single)))
    assert len({(out / r["edited"]).read_bytes() for r in rows}) == 4  # four different edits


def test_a_rerun_with_nothing_changed_or_only_vram_loads_no_model_and_a_changed_seed_redoes_only_that_row(
        tmp_path, monkeypatch, loads):
    pictures = write_pictures(tmp_path / "in", 3)
    rows = mixed_rows(pictures, 6, tmp_path)
    manifest = write_manifest(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    assert _batch(manifest, "--out", out) == 0
    first = results(out)
    assert sorted(loads) == [1, 2, 3, 4, 5, 6] and len(first) == 6

    with monkeypatch.context() as m:
        m.setattr(ModelCache, "get", lambda self, key: pytest.fail("a finished job loaded the model again"))
        assert _batch(manifest, "--out", out) == 0
        # --vram only moves model parts between memories (the same picture): no row is redone for it.
        assert _batch(manifest, "--out", out, "--vram", "low") == 0
    assert results(out) == first and len(loads) == 6

    rows[2]["seed"] += 1
    write_manifest(manifest, rows)
    assert _batch(manifest, "--out", out) == 0
    assert loads[6:] == [3]  # only the changed row
    second = results(out)
    assert len(second) == 6 and [r["row"] for r in triplets(out)] == [1, 2, 3, 4, 5, 6]
    changed = set(second) - set(first)
    assert len(changed) == 1 and {k: first[k] for k in second if k in first} == {
        k: v for k, v in second.items() if k not in changed
    }


def test_bad_rows_are_reported_with_their_row_number_and_every_good_row_is_done(tmp_path, caplog):
    pictures = write_pictures(tmp_path / "in", 2)
    (tmp_path / "in" / "notes.png").write_text("a text file named like a picture")
    Image.fromarray(np.full((20, 40), 255, np.uint8)).save(tmp_path / "in" / "big-mask.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "in" / "mask.png")
    manifest = write_manifest(tmp_path / "rows.jsonl", [
        {"image": "in/pic00.png", "instruction": "make the circle red"},
        {"image": "in/missing.png", "instruction": "make the circle red"},
        {"image": "in/notes.png", "instruction": "make the circle red"},
        {"image": "in/pic01.png", "instruction": "make the circle red", "mask": "in/big-mask.png"},
        {"image": "in/pic01.png", "instruction": "  "},
        {"image": "in/pic01.png", "instruction": "remove the star", "mask": "in/mask.png", "seed": 3},
    ])
    out = tmp_path / "out"

    assert _batch(manifest, "--out", out) == 1  # finished, but not every row could be done

    assert [(r["row"], r["input"], r["mask"]) for r in triplets(out)] == [
        (1, "../in/pic00.png", None), (6, "../in/pic01.png", "../in/mask.png")]
    said = caplog.text
    assert "6 rows: 2 edited" in said and "4 failed" in said
    assert "row 2 (missing.png)" in said and "no such picture" in said
    assert "row 3 (notes.png)" in said and "cannot be read as a picture" in said
    assert "row 4 (pic01.png)" in said and "mask big-mask.png is 40x20 but the picture is 32x32" in said
    assert "row 5 (pic01.png)" in said and "the instruction is empty" in said
    assert pictures  # the good rows' pictures exist (checked through the manifest above)


def test_the_triplets_of_a_batch_train_with_the_trainer_unchanged(tmp_path):
    from ip2p_nodes.pipeline_core.models.assets import toy_model_path
    from ip2p_nodes.pipeline_core.training.cli import main as train

    write_pictures(tmp_path / "in", 2)
    out = tmp_path / "out"
    assert _batch(tmp_path / "in", "--out", out, "--instruction", INSTRUCTIONS[0]) == 0

    assert train(["train", "--model", str(toy_model_path()), "--data", str(out / "triplets.jsonl"),
                  "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--precision", "no",
                  "--lora-rank", "2", "--checkpoint-every", "100"]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def _wait_for_lines(path, count: int, proc, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"the job ended (status {proc.returncode}) before {count} rows were done")
        time.sleep(0.05)
    pytest.fail(f"fewer than {count} rows done after {timeout} s")


def test_a_job_killed_mid_way_resumes_to_every_row_exactly_once_with_the_uninterrupted_pictures(tmp_path):
    pictures = write_pictures(tmp_path / "in", 4)
    manifest = write_manifest(tmp_path / "rows.jsonl", mixed_rows(pictures, 8, tmp_path))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _batch(manifest, "--out", straight) == 0

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "ip2p_nodes.pipeline_core.cli", "batch", str(manifest), "--out", str(killed),
               *TOY_ARGS]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_lines(killed / "triplets.jsonl", 3, proc)
        proc.send_signal(signal.SIGKILL)  # no clean-up of any kind: as a power cut or the OOM killer would
    finally:
        proc.kill()
        proc.wait()
    done = len(triplets(killed))
    assert 3 <= done < 8, "the kill came too late to test anything"

    assert _batch(manifest, "--out", killed) == 0

    rows = triplets(killed)
    assert sorted(r["row"] for r in rows) == list(range(1, 9))  # every row, once
    assert results(killed) == results(straight)  # the same pictures, byte for byte
    names = {p.name for p in killed.iterdir()}
    assert names == {r["edited"] for r in rows} | {"triplets.jsonl", ".ip2p-batch"}  # nothing half-written
    assert not any((killed / ".ip2p-batch" / "tmp").iterdir())


def test_a_cut_off_manifest_line_is_dropped_and_its_row_redone(tmp_path, loads):
    pictures = write_pictures(tmp_path / "in", 2)
    manifest = write_manifest(tmp_path / "rows.jsonl", mixed_rows(pictures, 2, tmp_path))
    out = tmp_path / "out"
    assert _batch(manifest, "--out", out) == 0
    whole = results(out)
    lines = (out / "triplets.jsonl").read_text().splitlines()
    # A crash in the middle of appending the second line: its picture is in place, its line half written.
    (out / "triplets.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])

    assert _batch(manifest, "--out", out) == 0
    assert loads[2:] == [2] and results(out) == whole
    assert all(json.loads(line) for line in (out / "triplets.jsonl").read_text().splitlines())


def test_two_jobs_cannot_write_to_one_folder_at_once(tmp_path):
    with OutputStore(tmp_path / "out"):
        with pytest.raises(InputError, match="another batch job is writing there"):
            with OutputStore(tmp_path / "out"):
                pass
    with OutputStore(tmp_path / "out"):  # released when the first job ends
        pass


@pytest.mark.parametrize(
    "extra,said",
    [
        (["--steps", "0"], "steps must be between 1 and 500, got 0"),
        (["--seed", str(2**70)], "seed must be between 0 and 18446744073709551615"),
        (["--lora", "no-such.safetensors"], "--lora no-such.safetensors: LoRA file not found"),
        (["--address", "auto"], "--address is for --engine ray"),
        (["--instruction", " "], "the instruction is empty"),
        (["--out-is-a-file"], "is a file; give a folder"),
        (["--no-instruction"], "say what to do with --instruction"),
        (["--min-image", "0.5"], "--min-direction and --min-image are thresholds of the CLIP filter"),
        (["--filter-clip", "no-such-clip/"], "no-such-clip/: no such folder"),
        (["--filter-clip", "toy", "--min-direction", "2"], "--min-direction 2: a cosine similarity, in -1..1"),
    ],
)
def test_arguments_are_checked_before_the_model_loads(tmp_path, caplog, no_model_load, extra, said):
    write_pictures(tmp_path / "in", 1)
    out = tmp_path / "out"
    if extra == ["--out-is-a-file"]:
        out.write_text("")
        extra = []
    instruction = [] if extra == ["--no-instruction"] or "--instruction" in extra else ["--instruction", "x"]
    extra = [] if extra == ["--no-instruction"] else extra
    assert cli.main(["batch", str(tmp_path / "in"), "--out", str(out), *instruction, *TOY_ARGS, *extra]) == 2
    assert said in caplog.text


def test_the_ray_engine_without_ray_says_how_to_install_it(tmp_path, caplog, monkeypatch, no_model_load):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: `import ray` fails
    write_pictures(tmp_path / "in", 1)
    assert _batch(tmp_path / "in", "--out", tmp_path / "out", "--instruction", "x", "--engine", "ray") == 2
    assert 'pip install "ip2p-nodes[ray]"' in caplog.text
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------- --filter-clip

def _scores(out) -> dict[int, tuple[float, float]]:
    """row -> (clip_direction, clip_image), measured here with score_edits on the pictures as written."""
    from ip2p_nodes.pipeline_core.editing.images import load_image
    from ip2p_nodes.pipeline_core.scoring import CLIP_CACHE, ClipSource, score_edits

    scorer = CLIP_CACHE.get(ClipSource.from_text("toy"))
    measured = {}
    for r in triplets(out) + filtered(out):
        [s] = score_edits(scorer, load_image(out / r["input"]), load_image(out / r["edited"]), r["instruction"],
                          r.get("caption_before"), r.get("caption_after"))
        measured[r["row"]] = (s.clip_direction, s.clip_image)
    return measured


def _split(out) -> tuple[list[int], list[int]]:
    return [r["row"] for r in triplets(out)], [r["row"] for r in filtered(out)]


@pytest.fixture
def clip_loads(monkeypatch):
    """Counts the CLIPs loaded for scoring."""
    from ip2p_nodes.pipeline_core.scoring import clip

    loaded = []
    real = clip.load_clip

    def counting(source, device="cpu"):
        loaded.append(source.name)
        return real(source, device)

    monkeypatch.setattr(clip, "load_clip", counting)
    clip.CLIP_CACHE.clear()
    yield loaded
    clip.CLIP_CACHE.clear()


def _toy_batch(*args) -> int:
    """The toy model by its alias (its own guidance) at 4 steps: edits good and bad enough that the toy CLIP's
    scores spread on both sides of the thresholds (at 2 steps nearly every edit scores low)."""
    return cli.main(["batch", *map(str, args), "--model", "toy", "--steps", "4"])


def test_the_clip_filter_keeps_exactly_the_edits_above_both_thresholds_and_refilters_without_editing(
        tmp_path, monkeypatch, loads, clip_loads):
    pictures = write_pictures(tmp_path / "in", 4)
    manifest = write_manifest(tmp_path / "rows.jsonl", mixed_rows(pictures, 8, tmp_path))
    out = tmp_path / "out"
    direction, image = 0.2, 0.5

    assert _toy_batch(manifest, "--out", out, "--filter-clip", "toy", "--min-direction", direction,
                  "--min-image", image) == 0

    measured = _scores(out)
    kept, dropped = _split(out)
    assert sorted(kept + dropped) == list(range(1, 9)) and sorted(loads) == list(range(1, 9))
    assert kept == [n for n in range(1, 9) if measured[n][0] >= direction and measured[n][1] >= image]
    assert kept and dropped, f"thresholds that split nothing test nothing: {measured}"
    for r in triplets(out) + filtered(out):  # the stored scores are those of the written picture
        assert (r["clip_direction"], r["clip_image"]) == pytest.approx(measured[r["row"]], abs=1e-5)
        assert r["clip"] == "toy-clip" and r["direction_from"] == "instruction"
    first = results(out)

    # Same command again: nothing edited, nothing loaded, the same rows.
    with monkeypatch.context() as m:
        m.setattr(ModelCache, "get", lambda self, key: pytest.fail("a finished job loaded the model again"))
        assert _toy_batch(manifest, "--out", out, "--filter-clip", "toy", "--min-direction", direction,
                      "--min-image", image) == 0
        assert _split(out) == (kept, dropped) and results(out) == first
        # New thresholds: re-filtered from the stored scores, neither edit model nor CLIP loaded.
        before = len(clip_loads)
        assert _toy_batch(manifest, "--out", out, "--filter-clip", "toy", "--min-direction", "-1",
                      "--min-image", "0.9") == 0
        assert _split(out)[0] == [n for n in range(1, 9) if measured[n][1] >= 0.9]
        assert len(clip_loads) == before
        # No filter: every done row is a training row again, and filtered.jsonl goes.
        assert _toy_batch(manifest, "--out", out) == 0
        assert _split(out) == (list(range(1, 9)), []) and not (out / "filtered.jsonl").exists()
        assert _toy_batch(manifest, "--out", out, "--filter-clip", "toy", "--min-direction", direction,
                      "--min-image", image) == 0
        assert _split(out) == (kept, dropped) and len(clip_loads) == before
    assert len(loads) == 8


def test_a_filter_added_to_a_finished_job_scores_its_pictures_without_editing_them(
        tmp_path, monkeypatch, loads, caplog):
    pictures = write_pictures(tmp_path / "in", 2)
    rows = mixed_rows(pictures, 3, tmp_path)
    rows[0].update(caption_before="a red circle and a star", caption_after="a red circle")
    rows[2].update(caption_before="only this one")
    manifest = write_manifest(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    assert _batch(manifest, "--out", out) == 0  # no filter: captions are not read, every row is done
    assert [r["row"] for r in triplets(out)] == [1, 2, 3]

    with monkeypatch.context() as m:
        m.setattr(ModelCache, "get", lambda self, key: pytest.fail("scoring done rows loaded the edit model"))
        assert _batch(manifest, "--out", out, "--filter-clip", "toy", "--min-direction", "-1",
                      "--min-image", "-1") == 1
    assert len(loads) == 3
    assert [r["row"] for r in triplets(out)] == [1, 2] and "2 pictures done before scored now" in caplog.text
    by_row = {r["row"]: r for r in triplets(out)}
    assert by_row[1]["direction_from"] == "captions" and by_row[2]["direction_from"] == "instruction"
    assert (by_row[1]["clip_direction"], by_row[1]["clip_image"]) == pytest.approx(_scores(out)[1], abs=1e-5)
    assert "row 3 (pic00.png): only one caption was given" in caplog.text


def test_moving_rows_between_triplets_and_filtered_never_loses_a_row_to_a_crash(tmp_path, monkeypatch):
    out = tmp_path / "out"
    records = [{"key": f"k{i}", "edited": f"p{i}.png", "row": i} for i in range(4)]
    with OutputStore(out) as store:
        for r in records:
            store.put_picture(r["edited"], b"png")
        store.rewrite(records[:2], records[2:])
    real = os.replace
    for crash_at in (1, 2, 3):  # the three replaces of a rewrite that swaps the two halves
        calls = []

        def crashing(src, dst, crash_at=crash_at, calls=calls):
            calls.append(dst)
            if len(calls) == crash_at:
                raise OSError("power cut")
            return real(src, dst)

        with OutputStore(out) as store:
            monkeypatch.setattr(os, "replace", crashing)
            with pytest.raises(OSError):
                store.rewrite(records[2:], records[:2])
            monkeypatch.setattr(os, "replace", real)
            assert sorted(store.read()) == ["k0", "k1", "k2", "k3"], f"a row was lost at replace {crash_at}"
            store.rewrite(records[:2], records[2:])  # as the next run's start would
    with OutputStore(out) as store:
        store.rewrite(records[2:], records[:2])
    assert [r["key"] for r in triplets(out)] == ["k2", "k3"] and [r["key"] for r in filtered(out)] == ["k0", "k1"]
