"""Where the loader node finds models, and how a picked name becomes a :class:`pipeline_core.ModelSource`.

Choices come from three ComfyUI model folders: ``instructpix2pix`` (registered by this pack), ``checkpoints``
(single files) and ``diffusers`` (folders holding ``model_index.json``). Single files carry no CLIP tokenizer;
inside ComfyUI they get ComfyUI's own bundled SD1 tokenizer, so an SD1.5 IP2P ``.safetensors`` loads with no
network at all.

The pack's embedded toy model (:mod:`pipeline_core.models.assets`, 32 x 32 pictures of coloured shapes) is always
the last choice: a user's own models come first, so a new loader node defaults to one of them, and with no model
at all the toy model is the default, so the node and the "Toy demo, no download" workflow run without any download.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import folder_paths

from ..pipeline_core.errors import ModelLoadError
from ..pipeline_core.models.assets import SAMPLE_IMAGE_NAME, TOY_MODEL_CHOICE, sample_image_path, toy_model_path
from ..pipeline_core.models.controlnet import CONTROLNET_SUFFIXES
from ..pipeline_core.models.loading import SINGLE_FILE_SUFFIXES, ModelSource

log = logging.getLogger(__name__)

IP2P_FOLDER = "instructpix2pix"
FILE_FOLDERS = (IP2P_FOLDER, "checkpoints")  # searched in this order; a name in both resolves to ours
DIFFUSERS_FOLDER = "diffusers"


def register_model_folder() -> str:
    """Add ``models/instructpix2pix`` to ComfyUI's folder list; returns the default path. Idempotent.

    ``extra_model_paths.yaml`` is applied before packs are imported and may already name this folder: its
    paths are kept, ours is appended after them, never replacing them.
    """
    default = os.path.join(folder_paths.models_dir, IP2P_FOLDER)
    folder_paths.add_model_folder_path(IP2P_FOLDER, default, is_default=False)
    paths, extensions = folder_paths.folder_names_and_paths[IP2P_FOLDER]
    # A key created by the yaml (or by add_model_folder_path) has an empty extension set, which ComfyUI reads
    # as "every file"; list checkpoint files only, as the checkpoints folder does.
    folder_paths.folder_names_and_paths[IP2P_FOLDER] = (paths, set(extensions) | set(SINGLE_FILE_SUFFIXES))
    return default


def provide_toy_sample() -> Path | None:
    """Put the toy demo's input picture into ComfyUI's input folder, once, never over a user's file.

    workflows/"Toy demo, no download.json" loads it by name, so the example runs as shipped on a fresh ComfyUI, as
    core's templates do with the bundled example.png.
    """
    import shutil

    target = Path(folder_paths.get_input_directory()) / SAMPLE_IMAGE_NAME
    if target.exists():
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_image_path(), target)
    except OSError as exc:  # a read-only input folder only costs the demo its picture, not the pack its nodes
        log.warning("ip2p: could not copy the toy demo picture to %s (%s)", target, exc)
        return None
    return target


def comfy_tokenizer_dir() -> str | None:
    """ComfyUI's bundled SD1 CLIP tokenizer (``comfy/sd1_tokenizer``), found from the ``comfy`` package."""
    import comfy

    # comfy is a namespace package (no __init__.py, no __file__): look in each of its folders.
    for base in comfy.__path__:
        folder = Path(base).resolve() / "sd1_tokenizer"
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return str(folder)
    return None


def _single_files(folder: str) -> list[str]:
    if folder not in folder_paths.folder_names_and_paths:
        return []
    # checkpoints also lists .sft/.pkl/.pt2; only what the loader can read is offered.
    return [n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(SINGLE_FILE_SUFFIXES)]


def diffusers_folders() -> list[str]:
    """Model folders (holding ``model_index.json``) under every ``diffusers`` path, relative to it."""
    found: set[str] = set()
    for base in folder_paths.get_folder_paths(DIFFUSERS_FOLDER):
        if not os.path.isdir(base):
            continue
        for root, subdirs, files in os.walk(base, followlinks=True):
            if "model_index.json" in files:
                found.add(os.path.relpath(root, base))
                subdirs[:] = []  # a model's own unet/, vae/ ... hold no further models
    return sorted(found)


def list_choices() -> list[str]:
    """Names for the loader's dropdown: IP2P folder files, checkpoint files, diffusers folders, the toy model."""
    names: list[str] = []
    for name in [*_single_files(IP2P_FOLDER), *_single_files("checkpoints"), *diffusers_folders()]:
        if name not in names:
            names.append(name)
    return [*names, TOY_MODEL_CHOICE]


def _with_tokenizer(source: ModelSource) -> ModelSource:
    if source.kind != "single_file":
        return source
    return dataclasses.replace(source, tokenizer_dir=comfy_tokenizer_dir())


def resolve(choice: str, hub_id: str = "") -> ModelSource:
    """The model a loader node means: ``hub_id`` when it is filled in, else the dropdown ``choice``."""
    hub_id = (hub_id or "").strip()
    if hub_id:
        # A typed local path works too; only an owner/name id can ever reach the network.
        source = ModelSource.from_path(hub_id)
        if source.location == str(toy_model_path()):  # typed "toy": the same model (and cache entry) as the choice
            return source
        return _with_tokenizer(source)
    if choice == TOY_MODEL_CHOICE:
        # It carries its own tokenizer (a word-level vocabulary of the shapes world): ComfyUI's SD1 one is not used.
        return ModelSource("single_file", str(toy_model_path()))
    if not choice:
        raise ModelLoadError(
            "no model picked: copy an InstructPix2Pix checkpoint (e.g. instruct-pix2pix-00-22000.safetensors) "
            f"into {os.path.join(folder_paths.models_dir, IP2P_FOLDER)}, or a diffusers model folder into "
            f"{os.path.join(folder_paths.models_dir, DIFFUSERS_FOLDER)}, then refresh (R) and pick it; or type a "
            "Hugging Face id in hub_id"
        )
    for folder in FILE_FOLDERS:
        if folder in folder_paths.folder_names_and_paths:
            path = folder_paths.get_full_path(folder, choice)
            if path is not None:
                return _with_tokenizer(ModelSource("single_file", str(Path(path).resolve())))
    relative = os.path.relpath(os.path.join(os.sep, choice), os.sep)  # no escaping the model folders
    for base in folder_paths.get_folder_paths(DIFFUSERS_FOLDER):
        candidate = Path(base) / relative
        if (candidate / "model_index.json").is_file():
            return ModelSource("diffusers", str(candidate.resolve()))
    searched = [p for f in (*FILE_FOLDERS, DIFFUSERS_FOLDER) if f in folder_paths.folder_names_and_paths
                for p in folder_paths.get_folder_paths(f)]
    raise ModelLoadError(
        f"{choice}: not found in the model folders ({', '.join(searched)}); it was moved or deleted — refresh "
        "(R) and pick another model"
    )


CONTROLNET_FOLDER = "controlnet"  # ComfyUI's own folder, shared with its Load ControlNet Model node


def controlnet_choices() -> list[str]:
    """ControlNet files in ComfyUI's ``controlnet`` folders that the pack can read."""
    if CONTROLNET_FOLDER not in folder_paths.folder_names_and_paths:
        return []
    return [n for n in folder_paths.get_filename_list(CONTROLNET_FOLDER) if n.lower().endswith(CONTROLNET_SUFFIXES)]


def resolve_controlnet(choice: str) -> str:
    """The full path of a ControlNet picked in the dropdown, or an error saying where it was looked for."""
    path = folder_paths.get_full_path(CONTROLNET_FOLDER, choice) if choice else None
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(CONTROLNET_FOLDER))
        raise ModelLoadError(
            f"{choice or 'no ControlNet picked'}: not found in the controlnet folders ({folders}); copy a ControlNet "
            "(e.g. control_v11p_sd15_canny_fp16.safetensors) there, refresh (R) and pick it"
        )
    return path
