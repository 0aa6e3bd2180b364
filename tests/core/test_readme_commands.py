"""The README's two quick-start commands (each with its CPU-only line) are what CI runs, and say what they need."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CPU_TORCH = "torch==2.13.0 "


def readme_commands() -> list[str]:
    return [line for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("python3 -m venv .venv && ")]


def ci_test_commands() -> dict[str, str]:
    return dict(re.findall(r"^(TEST_COMMAND_\w+)='(.*)'$", (ROOT / ".ci" / "run").read_text(), flags=re.M))


def test_the_readme_gives_a_demo_and_a_test_command_each_with_a_cpu_only_line():
    commands = readme_commands()
    demo = [c for c in commands if c.endswith("&& .venv/bin/ip2p-edit demo -o demo.png")]
    tests = [c for c in commands if " -m pytest tests " in c]
    assert len(commands) == 4 and len(demo) == 2 and len(tests) == 2, commands
    for cpu, plain in (demo, tests):
        # The CPU-only line pins the CPU build of torch; otherwise the two lines are the same.
        assert CPU_TORCH in cpu and "torch" not in plain
        assert cpu.replace(CPU_TORCH, "") == plain


def test_ci_runs_the_readmes_test_command_lines():
    tests = [c for c in readme_commands() if " -m pytest tests " in c]
    assert sorted(ci_test_commands().values()) == sorted(tests)
    assert "ruff check" in tests[0], "the test command lints first"


def test_the_test_extra_installs_what_the_test_command_calls():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert {re.split(r"[<>=]", req)[0] for req in extra} >= {"pytest", "ruff"}
