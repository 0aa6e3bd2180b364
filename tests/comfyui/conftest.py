"""Fixtures of the comfyui tier: the pack set up inside this process's ComfyUI, with model folders of its own.

ComfyUI's modules are imported inside the fixtures: without ``COMFYUI_DIR`` this file still loads, and the
tests that use them skip, saying why.
"""

from __future__ import annotations

import pytest

from support import comfy_harness

TINY = "tiny-ip2p.safetensors"


@pytest.fixture
def comfy_env(tmp_path, monkeypatch):
    """ComfyUI's model folders pointed at empty temp folders, and the pack set up as ComfyUI sets it up.

    Restores folder_paths, the shared cache and its residency afterwards, so tests do not leak into others.
    """
    comfy_harness.import_comfyui()
    import comfy.model_management as mm
    import folder_paths

    from ip2p_nodes.nodes import extension, model_paths
    from ip2p_nodes.pipeline_core import MODEL_CACHE

    models = tmp_path / "models"
    dirs = {name: models / name for name in ("instructpix2pix", "checkpoints", "diffusers", "loras")}
    for d in dirs.values():
        d.mkdir(parents=True)
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints",
                        ([str(dirs["checkpoints"])], folder_paths.supported_pt_extensions))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(dirs["diffusers"])], ["folder"]))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(dirs["loras"])], folder_paths.supported_pt_extensions))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, model_paths.IP2P_FOLDER, raising=False)
    previous_residency = MODEL_CACHE.residency
    MODEL_CACHE.clear()
    extension.setup()
    yield dirs
    MODEL_CACHE.clear()
    MODEL_CACHE.residency = previous_residency
    mm.interrupt_current_processing(False)


@pytest.fixture
def tiny(comfy_env, tiny_single_file):
    """The tiny IP2P model as a single file in models/instructpix2pix; returns its loaded IP2P_MODEL."""
    from ip2p_nodes.nodes.loader import IP2PModelLoader

    comfy_harness.copy_into(tiny_single_file, comfy_env["instructpix2pix"], TINY)
    return IP2PModelLoader.execute(TINY, "", "fp32")[0]
