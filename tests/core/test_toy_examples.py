"""Every toy-model example the pack shows a user does what it says, as shipped, at its own seed and settings.

The examples are read from where users read them — README.md, the ``ip2p-edit demo`` help, the "Toy demo, no
download" workflow (its instruction and its "Try also" note) — so an example added there is tested here too.
Each edit is rule-checked against the exact edit of the sample scene (:func:`synthetic.instructed`).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from ip2p_nodes.pipeline_core import ModelCache, PlanItem, edit, encode_instruction
from ip2p_nodes.pipeline_core.editing.images import load_image
from ip2p_nodes.pipeline_core.models.assets import SAMPLE_INSTRUCTION, TOY_MODEL_ALIAS, sample_image_path
from ip2p_nodes.pipeline_core.models.loading import ModelSource
from ip2p_nodes.pipeline_core.training import synthetic
from ip2p_nodes.pipeline_core.training.evaluation import rule_check
from ip2p_nodes.pipeline_core.training.toy import sample_scene

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TOY_WORKFLOW = ROOT / "workflows" / "Toy demo, no download.json"


def readme_demo_instructions() -> list[str]:
    """``ip2p-edit demo`` lines of the README: their ``--instruction``, or the default one."""
    found = []
    for line in README.splitlines():
        if line.lstrip().startswith("ip2p-edit demo") or "ip2p-edit demo -o" in line:
            m = re.search(r'--instruction "([^"]+)"', line)
            found.append(m.group(1) if m else SAMPLE_INSTRUCTION)
    return found


def readme_toy_edit_commands() -> list[list[str]]:
    """``ip2p-edit edit ... --model toy`` commands of the README, as argv: code-block lines (continuations joined)
    and inline code spans (which may wrap across lines)."""
    fenced = re.findall(r"```bash\n(.*?)```", README, re.S)
    candidates = [line.split("#", 1)[0] for block in fenced for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    candidates += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    return [shlex.split(c.strip())[1:] for c in candidates
            if c.strip().startswith("ip2p-edit edit ") and "--model toy" in c]


def cli_help_instructions() -> list[str]:
    from ip2p_nodes.pipeline_core.cli import build_parser

    parser = build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]  # noqa: SLF001 (argparse has no public getter)
    help_text = next(a.help for a in demo._actions if "--instruction" in a.option_strings)  # noqa: SLF001
    return re.findall(r'"([^"]+)"', help_text)


def workflow_examples() -> tuple[dict, list[str]]:
    """The toy workflow's sampler settings and its instructions: the one it runs and those its note suggests."""
    graph = json.loads(TOY_WORKFLOW.read_text())
    by_type = {n["type"]: n for n in graph["nodes"]}
    seed, _, steps, s_t, s_i, scheduler = by_type["IP2PSampler"]["widgets_values"][:6]
    note = by_type["MarkdownNote"]["widgets_values"][0]
    suggested = re.findall(r"\*([a-z][a-z ]+)\*", note.split("Try also:", 1)[1])
    instructions = [by_type["IP2PInstruction"]["widgets_values"][0], *suggested]
    return dict(seed=seed, steps=steps, text_guidance=s_t, image_guidance=s_i, scheduler=scheduler), instructions


def test_the_examples_are_found_where_users_read_them():
    """Guards the readers above: if a document's format changes, this fails instead of testing nothing."""
    assert set(readme_demo_instructions()) == {SAMPLE_INSTRUCTION, "remove the triangle"}
    assert any("--pick-best" in c for c in readme_toy_edit_commands())
    assert {"remove the triangle", "add a green star"} <= set(cli_help_instructions())
    settings, instructions = workflow_examples()
    assert len(instructions) == 6 and settings["text_guidance"] == 3.0


def _check(instruction: str, output: torch.Tensor):
    truth = synthetic.instructed(sample_scene(), instruction)
    ok, why = rule_check(truth, output[0].numpy())
    assert ok, f"{instruction!r}: {why}"


@pytest.mark.parametrize("instruction", sorted(set(readme_demo_instructions()) | set(cli_help_instructions())))
def test_every_demo_example_does_what_it_says_at_the_default_seed(instruction, tmp_path):
    from ip2p_nodes.pipeline_core.demo import run_demo

    result = run_demo(tmp_path / "demo.png", instruction=instruction, cache=SHARED_CACHE)
    _check(instruction, result.output)


@pytest.mark.parametrize("instruction", workflow_examples()[1])
def test_every_toy_workflow_example_does_what_it_says_at_the_workflows_settings(instruction):
    settings, _ = workflow_examples()
    model = SHARED_CACHE.get(SHARED_CACHE.key_for(ModelSource.from_path(TOY_MODEL_ALIAS), "fp32", "cpu"))
    seed = settings.pop("seed")
    result = edit(model, encode_instruction(model, instruction), load_image(sample_image_path()),
                  [PlanItem(seed=seed)], **settings)
    _check(instruction, result.images)


@pytest.mark.parametrize("argv", readme_toy_edit_commands(), ids=lambda a: " ".join(a[:2]))
def test_every_readme_toy_edit_command_writes_a_correct_edit(argv, tmp_path, monkeypatch):
    """The README's commands name ``sample.png`` / ``picture.png``: here that is the shipped sample picture."""
    import shutil

    from ip2p_nodes.pipeline_core.cli import main

    shutil.copyfile(sample_image_path(), tmp_path / argv[1])
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    out = argv[argv.index("-o") + 1]
    _check(argv[2], load_image(tmp_path / out))


SHARED_CACHE = ModelCache()
