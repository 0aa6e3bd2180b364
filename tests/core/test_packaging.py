"""Packaging promises: importable outside ComfyUI without side effects, no shadowing, registry metadata."""

import ast
import fnmatch
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACK_DIRS = [ROOT / "pipeline_core", ROOT / "nodes"]
COMFY_MODULES = {
    "comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes", "execution",
}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node, node.module.split(".")[0]


def test_pipeline_core_never_imports_comfyui():
    offenders = [
        f"{p.relative_to(ROOT)}:{node.lineno} imports {mod}"
        for p in (ROOT / "pipeline_core").rglob("*.py")
        for node, mod in _imports(p)
        if mod in COMFY_MODULES
    ]
    assert offenders == []


def test_the_pack_logs_and_never_prints():
    offenders = []
    for d in PACK_DIRS + [ROOT / "__init__.py"]:
        for p in ([d] if d.is_file() else d.rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                    offenders.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_importing_the_package_outside_comfyui_has_no_side_effects():
    code = (
        "import sys, ip2p_nodes, ip2p_nodes.pipeline_core;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in %r);"
        "assert not bad, bad;"
        "assert callable(ip2p_nodes.comfy_entrypoint);"
        "assert not hasattr(ip2p_nodes, 'NODE_CLASS_MAPPINGS')" % (COMFY_MODULES,)
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_no_top_level_nodes_module_is_installed():
    # ComfyUI's own `nodes` module must never be shadowed by ours.
    out = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('nodes'))"],
                         capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "None"


def test_pyproject_has_registry_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert project["name"] == "ip2p-nodes" and "comfyui" not in project["name"].lower()
    major, minor, patch = project["version"].split(".")
    assert all(x.isdigit() for x in (major, minor, patch))
    assert project["license"] and project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert "Icon" in comfy


def test_requirements_leave_torch_numpy_pillow_to_comfyui():
    reqs = [line.split(">=")[0].split("==")[0].strip().lower()
            for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert reqs and not {"torch", "numpy", "pillow"} & set(reqs)


def test_shipped_configs_are_package_data():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = meta["tool"]["setuptools"]
    # Every shipped data file must be matched by a package-data pattern of a listed package.
    models = ROOT / "pipeline_core" / "models"
    shipped = [f for f in [*(models / "configs").rglob("*.json"), *(models / "assets").rglob("*")] if f.is_file()]
    assert shipped
    for f in shipped:
        # The deepest listed package holding the file; its patterns are relative to that package's folder (a data
        # folder inside it, like assets/toy-clip, is matched as "toy-clip/*").
        holders = [d for d in f.relative_to(ROOT).parents if "ip2p_nodes." + ".".join(d.parts) in tool["packages"]]
        assert holders and holders[0].parts, f"{f.relative_to(ROOT)}: no listed package holds it"
        package = "ip2p_nodes." + ".".join(holders[0].parts)
        relative = f.relative_to(ROOT / holders[0]).as_posix()
        patterns = tool["package-data"].get(package, [])
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), f"{relative} not shipped"


@pytest.mark.skipif(not Path(sys.prefix, "bin", "comfy").exists(), reason="comfy-cli not installed in this environment")
def test_comfy_node_validate_passes():
    comfy = str(Path(sys.prefix, "bin", "comfy"))
    out = subprocess.run([comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
