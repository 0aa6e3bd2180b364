"""The soak benchmark, short: 12 mixed prompts through a real ComfyUI server (COMFYUI_DIR), with a Cancel and a
``POST /free`` in between, must leave the server's memory where it was one cycle earlier and the last picture
as a fresh server makes it. The full run (50 prompts) is by hand: ``python benchmarks/soak.py --prompts 50``.

Run as a separate process, as a user runs the benchmark; it writes a full-size SD1.5-IP2P-shaped checkpoint
(2 GB, random weights) and starts two servers, so this is the slowest test of the server tier (minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support import comfy_harness

comfy_harness.skip_without_comfyui()

pytestmark = pytest.mark.server

SOAK = comfy_harness.REPO_ROOT / "benchmarks" / "soak.py"


def test_short_soak_keeps_rss_flat_and_the_last_picture_equal_to_a_fresh_servers(tmp_path):
    figures = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(SOAK), "--prompts", "12", "--workdir", str(tmp_path), "--json", str(figures)],
        capture_output=True, text=True, env=dict(os.environ), timeout=3600,
    )
    report = run.stdout + run.stderr[-6000:]
    assert figures.is_file(), report
    result = json.loads(figures.read_text())
    assert result["baseline"] == 4 and len(result["rss"]) == 12
    # The Cancel stopped its prompt early and /free gave the models' RAM back (the SD1.5 one alone is 2 GB) ...
    assert 0 < result["cancelled_at_step"] < 500, report
    assert result["rss_before_free"] - result["rss_after_free"] > 1.5 * 2**30, report
    # ... and after reloading everything the server is as big as one cycle before: nothing accumulates.
    assert abs(result["ratio"] - 1) <= 0.05, report
    assert result["outputs"] == 4 and result["last_equals_fresh"], report
    assert run.returncode == 0 and "PASS" in run.stdout, report

