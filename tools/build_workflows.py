"""Rebuild the example workflows in ``workflows/`` with the real ComfyUI frontend, and their thumbnails.

Each graph is built in the ComfyUI web app itself (headless Chromium against a live ComfyUI with this pack,
through the app's own LiteGraph API, as a user's clicks would) and saved with the app's *Export* command, so
every ``.json`` is exactly what the frontend writes (UI format 0.4). The pictures the Load Image nodes name
(ComfyUI's ``example.png``, the pack's toy sample) are in the server's input folder, and the layout is made
once the app shows their previews, so a user opening a file sees it as saved; a layout in which nodes overlap
or straddle a group is refused (``tests/support/workflow_layout.py``).

The file names are the titles ComfyUI's Templates browser shows (``tests/support/example_workflows.py``). The
``.jpg`` of the same name is the browser's thumbnail: a result picture where the workflow can make a real one
here (the toy demo, run on the server with the pack's embedded model), else a screenshot of the graph.

Needs ``COMFYUI_DIR`` (a ComfyUI checkout), Debian's ``chromium`` and the ``playwright`` package; it downloads
nothing. The model files the widgets name are written with random weights by ``tests/support/model_files.py``
so the dropdowns hold them, as they would on a user's machine::

    COMFYUI_DIR=/opt/comfy/ComfyUI python tools/build_workflows.py            # all
    COMFYUI_DIR=/opt/comfy/ComfyUI python tools/build_workflows.py basic_edit # some, by key

The specs below are the single source of the graphs: edit a spec and re-run, never the JSON by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test support package, tests/support, is shared with the tests

from ip2p_nodes.pipeline_core.models.assets import (  # noqa: E402
    SAMPLE_IMAGE_NAME,
    SAMPLE_INSTRUCTION,
    TOY_CLIP_CHOICE,
    TOY_MODEL_CHOICE,
)
from support import (  # noqa: E402
    browser_harness,
    comfy_harness,
    example_workflows,
    model_files,
    workflow_format,
    workflow_layout,
)

log = logging.getLogger("build_workflows")

WORKFLOW_DIR = REPO / "workflows"
PACK_ID = "ip2p-nodes"
PACK_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

# Where users get the files the widgets name; the frontend offers these links when a file is missing, and only
# for ``.safetensors`` / ``.sft`` files from huggingface.co or civitai.com.
MODEL_URLS = {
    model_files.SD15_NAME: (
        "checkpoints",
        "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
        "v1-5-pruned-emaonly-fp16.safetensors?download=true",
    ),
    model_files.CONTROLNET_NAME: (
        "controlnet",
        "https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"
        "control_v11p_sd15_canny_fp16.safetensors?download=true",
    ),
    model_files.IP2P_NAME: (
        "instructpix2pix",
        "https://huggingface.co/timbrooks/instruct-pix2pix/resolve/main/instruct-pix2pix-00-22000.safetensors"
        "?download=true",
    ),
    # Gated: Hugging Face asks the user to accept Stability AI's licence before the download works.
    model_files.COSXL_NAME: (
        "checkpoints",
        "https://huggingface.co/stabilityai/cosxl/resolve/main/cosxl_edit.safetensors?download=true",
    ),
}
MODEL_WIDGETS = {
    "CheckpointLoaderSimple": "ckpt_name",
    "ControlNetLoader": "control_net_name",
    "IP2PModelLoader": "model",
    "IP2PApplyControlNet": "control_net",
}

GROUP_COLORS = {"native": "#3f789e", "ip2p": "#8A8A3F", "inpaint": "#88A", "out": "#444"}


@dataclass
class Node:
    key: str
    type: str
    col: int
    widgets: dict = field(default_factory=dict)
    title: str | None = None
    width: int | None = None
    height: int | None = None
    band: int = 0  # row of the layout: band 1 sits below band 0


@dataclass
class Group:
    title: str
    keys: list[str]
    color: str


@dataclass
class Workflow:
    name: str  # the key in example_workflows.TITLES; the file is named by its title
    nodes: list[Node]
    links: list[tuple[str, str, str, str]]  # (source key, output name, target key, input name)
    groups: list[Group] = field(default_factory=list)
    # The filename prefix of the Save Image whose picture becomes the thumbnail, for a workflow that makes a
    # real result here (no download); None: a screenshot of the graph.
    result_thumbnail: str | None = None

    @property
    def title(self) -> str:
        return example_workflows.TITLES[self.name]


def note(key: str, col: int, text: str, width: int = 360, height: int = 200) -> Node:
    return Node(key, "MarkdownNote", col, {"": text}, title="Note", width=width, height=height)


def ip2p_chain(col: int, instruction: str, seed: int = 42, band: int = 0, model: str = model_files.IP2P_NAME,
               text_guidance: float = 7.5, scheduler: str = "euler_ancestral", **sampler_widgets) -> list[Node]:
    """Loader, instruction and sampler of the pack, with the paper's defaults unless told otherwise."""
    nodes = [
        Node("ip2p_model", "IP2PModelLoader", col, {"model": model, "hub_id": "", "precision": "auto"}, width=380),
        Node("instruction", "IP2PInstruction", col, {"instruction": instruction, "negative": ""},
             width=340, height=200),
        Node(
            "edit",
            "IP2PSampler",
            col + 1,
            {
                "seed": seed,
                "control_after_generate": "fixed",
                "steps": 20,
                "text_guidance": text_guidance,
                "image_guidance": 1.5,
                "scheduler": scheduler,
                **sampler_widgets,
            },
        ),
    ]
    for node in nodes:
        node.band = band
    return nodes


IP2P_LINKS = [
    ("ip2p_model", "model", "instruction", "model"),
    ("ip2p_model", "model", "edit", "model"),
    ("instruction", "conditioning", "edit", "conditioning"),
]


def txt2img_nodes(prompt: str, negative: str, col: int, seed: int) -> list[Node]:
    return [
        Node("ckpt", "CheckpointLoaderSimple", col, {"ckpt_name": model_files.SD15_NAME}, width=380),
        Node("positive", "CLIPTextEncode", col + 1, {"text": prompt}, title="Prompt", width=380, height=150),
        Node("negative", "CLIPTextEncode", col + 1, {"text": negative}, title="Negative prompt", width=380, height=110),
        Node("latent", "EmptyLatentImage", col + 1, {"width": 512, "height": 512, "batch_size": 1}),
        Node(
            "ksampler",
            "KSampler",
            col + 2,
            {
                "seed": seed,
                "control_after_generate": "fixed",
                "steps": 20,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        ),
        Node("decode", "VAEDecode", col + 2, width=200),
    ]


def basic_edit() -> Workflow:
    return Workflow(
        "basic_edit",
        nodes=[
            Node("image", "LoadImage", 0, {"image": "example.png"}, title="Load Image (your picture)"),
            *ip2p_chain(1, "turn it into an oil painting"),
            Node("save", "SaveImage", 3, {"filename_prefix": "ip2p/edit"}, width=360, height=400),
            note(
                "note",
                0,
                "**InstructPix2Pix edit.** Pick a picture, write the change as an instruction, press Run.\n\n"
                "* **text guidance** (5-12): how strongly the instruction is applied.\n"
                "* **image guidance** (1.0-2.5): how much of the picture is kept.\n\n"
                "Model: `instruct-pix2pix-00-22000.safetensors` in `ComfyUI/models/instructpix2pix/`.",
                height=220,
            ),
        ],
        links=[*IP2P_LINKS, ("image", "IMAGE", "edit", "image"), ("edit", "image", "save", "images")],
    )


def txt2img_edit_inpaint() -> Workflow:
    nodes = [
        *txt2img_nodes(
            "a wooden cabin by a calm lake in the mountains, summer afternoon, photograph",
            "blurry, lowres, watermark",
            col=0,
            seed=42,
        ),
        Node("save_txt2img", "SaveImage", 3, {"filename_prefix": "ip2p/1_txt2img"}, width=300, height=330),
        *ip2p_chain(4, "make it a snowy winter evening", seed=7),
        Node("save_edit", "SaveImage", 6, {"filename_prefix": "ip2p/2_edited"}, width=300, height=330),
        Node("mask_canvas", "SolidMask", 0, {"value": 0.0, "width": 512, "height": 512}, title="Mask: empty canvas",
             band=1),
        Node("mask_area", "SolidMask", 0, {"value": 1.0, "width": 224, "height": 128}, title="Mask: area to repaint",
             band=1),
        Node("mask", "MaskComposite", 0, {"x": 144, "y": 352, "operation": "add"}, title="Mask: place the area",
             band=1),
        Node("feather", "FeatherMask", 0, {"left": 24, "top": 24, "right": 24, "bottom": 24}, band=1),
        Node("inpaint_text", "CLIPTextEncode", 1, {"text": "a red wooden rowing boat on the frozen lake, snow"},
             title="Inpaint prompt", width=360, height=120, band=1),
        Node("inpaint_cond", "InpaintModelConditioning", 1, {"noise_mask": True}, band=1),
        Node(
            "inpaint_sampler",
            "KSampler",
            2,
            {
                "seed": 3,
                "control_after_generate": "fixed",
                "steps": 20,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 0.9,
            },
            title="KSampler (inpaint)",
            band=1,
        ),
        Node("inpaint_decode", "VAEDecode", 2, width=200, band=1),
        Node("composite", "ImageCompositeMasked", 3, {"x": 0, "y": 0, "resize_source": False},
             title="Keep the edit outside the mask", band=1),
        Node("save_inpaint", "SaveImage", 4, {"filename_prefix": "ip2p/3_inpainted"}, width=300, height=330, band=1),
        note(
            "note",
            0,
            "**Text to image, then instruction edit, then inpainting.**\n\n"
            "1. SD1.5 makes a picture.\n2. InstructPix2Pix changes the mood of the whole picture (season, light).\n"
            "3. Native inpainting repaints one area of the edited picture; the rest stays exactly as edited.\n\n"
            "Move the area with *Mask: place the area* (x, y) and size it with *Mask: area to repaint*.",
            width=400,
            height=260,
        ),
    ]
    links = [
        ("ckpt", "CLIP", "positive", "clip"),
        ("ckpt", "CLIP", "negative", "clip"),
        ("ckpt", "MODEL", "ksampler", "model"),
        ("positive", "CONDITIONING", "ksampler", "positive"),
        ("negative", "CONDITIONING", "ksampler", "negative"),
        ("latent", "LATENT", "ksampler", "latent_image"),
        ("ksampler", "LATENT", "decode", "samples"),
        ("ckpt", "VAE", "decode", "vae"),
        ("decode", "IMAGE", "save_txt2img", "images"),
        *IP2P_LINKS,
        ("decode", "IMAGE", "edit", "image"),
        ("edit", "image", "save_edit", "images"),
        ("mask_canvas", "MASK", "mask", "destination"),
        ("mask_area", "MASK", "mask", "source"),
        ("mask", "MASK", "feather", "mask"),
        ("ckpt", "CLIP", "inpaint_text", "clip"),
        ("inpaint_text", "CONDITIONING", "inpaint_cond", "positive"),
        ("negative", "CONDITIONING", "inpaint_cond", "negative"),
        ("ckpt", "VAE", "inpaint_cond", "vae"),
        ("edit", "image", "inpaint_cond", "pixels"),
        ("feather", "MASK", "inpaint_cond", "mask"),
        ("ckpt", "MODEL", "inpaint_sampler", "model"),
        ("inpaint_cond", "positive", "inpaint_sampler", "positive"),
        ("inpaint_cond", "negative", "inpaint_sampler", "negative"),
        ("inpaint_cond", "latent", "inpaint_sampler", "latent_image"),
        ("inpaint_sampler", "LATENT", "inpaint_decode", "samples"),
        ("ckpt", "VAE", "inpaint_decode", "vae"),
        ("edit", "image", "composite", "destination"),
        ("inpaint_decode", "IMAGE", "composite", "source"),
        ("feather", "MASK", "composite", "mask"),
        ("composite", "IMAGE", "save_inpaint", "images"),
    ]
    groups = [
        Group("1 · Text to image (SD1.5)", ["ckpt", "positive", "negative", "latent", "ksampler", "decode",
                                             "save_txt2img", "note"], GROUP_COLORS["native"]),
        Group("2 · Instruction edit (InstructPix2Pix)", ["ip2p_model", "instruction", "edit", "save_edit"],
              GROUP_COLORS["ip2p"]),
        Group("3 · Inpaint one area (SD1.5)", ["mask_canvas", "mask_area", "mask", "feather", "inpaint_text",
                                               "inpaint_cond", "inpaint_sampler", "inpaint_decode", "composite",
                                               "save_inpaint"], GROUP_COLORS["inpaint"]),
    ]
    return Workflow("txt2img_edit_inpaint", nodes, links, groups)


def guidance_sweep() -> Workflow:
    chain = ip2p_chain(1, "make it look like a watercolor painting")
    return Workflow(
        "guidance_sweep",
        nodes=[
            Node("image", "LoadImage", 0, {"image": "example.png"}, title="Load Image (your picture)"),
            *chain,
            Node(
                "plan",
                "IP2PSeedPlan",
                1,
                {
                    "seed": 42,
                    "control_after_generate": "fixed",
                    "count": 2,
                    "mode": "increment",
                    "text_guidance_values": "5, 7.5, 10",
                    "image_guidance_values": "1.2, 1.5, 2",
                },
                width=320,
            ),
            Node("grid", "IP2PImageGrid", 3, {"columns": 3, "font_size": 0, "gap": 4}),
            Node("save", "SaveImage", 4, {"filename_prefix": "ip2p/sweep_grid"}, width=480, height=560),
            # The pick-best branch (issue 11). The scorer ships on the toy CLIP so the file runs as is; the note
            # says which CLIP to pick for photos.
            Node("clip", "IP2PClipScorerLoader", 2, {"clip": TOY_CLIP_CHOICE, "hub_id": ""}, width=300, band=1),
            Node("score", "IP2PEditScore", 3, {"instruction": "", "caption_before": "", "caption_after": ""},
                 width=300),
            Node("pick", "IP2PPickBest", 3, {"threshold": 0.8}, width=300, band=1),
            Node("save_best", "SaveImage", 4, {"filename_prefix": "ip2p/sweep_best"}, width=480, height=400, band=1),
            note(
                "note",
                0,
                "**Guidance sweep.** 2 seeds x 3 text guidance x 3 image guidance = 18 edits in one run, laid out "
                "in one grid (a row per seed and text guidance, a column per image guidance), each labelled with "
                "its values and its CLIP scores.\n\n**Pick best** keeps the edit that changed most the way asked "
                "(clip_direction) among those that keep the picture (clip_image >= threshold), as the paper reads "
                "its trade-off. The scorer ships set to the pack's toy CLIP so the workflow runs as is; for photos "
                "put a CLIP folder such as `openai/clip-vit-large-patch14` into `ComfyUI/models/clip/` and pick it "
                "(or type that id in *hub_id*).\n\nChange the lists in *IP2P Seed Batch*; any picture can be "
                "re-made alone from its label.",
                height=360,
            ),
        ],
        links=[
            *IP2P_LINKS,
            ("image", "IMAGE", "edit", "image"),
            ("plan", "plan", "edit", "plan"),
            ("edit", "image", "grid", "images"),
            ("clip", "scorer", "score", "scorer"),
            ("image", "IMAGE", "score", "input"),
            ("edit", "image", "score", "edited"),
            ("instruction", "conditioning", "score", "conditioning"),
            ("edit", "labels", "score", "labels"),
            ("score", "labels", "grid", "labels"),
            ("edit", "image", "pick", "edited"),
            ("score", "scores", "pick", "scores"),
            ("pick", "best", "save_best", "images"),
            ("grid", "image", "save", "images"),
        ],
    )


def batch_edit() -> Workflow:
    return Workflow(
        "batch_edit",
        nodes=[
            Node("image1", "LoadImage", 0, {"image": "example.png"}, title="Picture 1"),
            Node("image2", "LoadImage", 0, {"image": "example.png"}, title="Picture 2"),
            Node("image3", "LoadImage", 0, {"image": "example.png"}, title="Picture 3"),
            Node("batch", "BatchImagesNode", 1, title="Batch Images", width=240),
            *ip2p_chain(2, "make it a snowy winter day"),
            Node(
                "plan",
                "IP2PSeedPlan",
                2,
                {
                    "seed": 42,
                    "control_after_generate": "fixed",
                    "count": 2,
                    "mode": "increment",
                    "text_guidance_values": "",
                    "image_guidance_values": "",
                },
                width=320,
            ),
            Node("save", "SaveImage", 4, {"filename_prefix": "ip2p/batch"}, width=360, height=400),
            Node("grid", "IP2PImageGrid", 4, {"columns": 2, "font_size": 0, "gap": 4}),
            Node("save_grid", "SaveImage", 5, {"filename_prefix": "ip2p/batch_grid"}, width=360, height=520),
            note(
                "note",
                1,
                "**Batch edit.** Every picture of the batch is edited with every seed of the plan, by one model "
                "loaded once: 3 pictures x 2 seeds = 6 results. Pick your own pictures in the three *Load Image* "
                "nodes; more pictures: connect them to the next free input of *Batch Images* (they are scaled to the "
                "first one's size). The grid has a row per picture.",
                width=300,
                height=240,
            ),
        ],
        links=[
            ("image1", "IMAGE", "batch", "images.image0"),
            ("image2", "IMAGE", "batch", "images.image1"),
            ("image3", "IMAGE", "batch", "images.image2"),
            *IP2P_LINKS,
            ("batch", "IMAGE", "edit", "image"),
            ("plan", "plan", "edit", "plan"),
            ("edit", "image", "save", "images"),
            ("edit", "image", "grid", "images"),
            ("edit", "labels", "grid", "labels"),
            ("grid", "image", "save_grid", "images"),
        ],
    )


def controlnet_edit() -> Workflow:
    nodes = [
        Node("image", "LoadImage", 0, {"image": "example.png"}, title="Load Image (shape to follow)"),
        Node("canny", "Canny", 0, {"low_threshold": 0.4, "high_threshold": 0.8}),
        Node("edges", "PreviewImage", 0, title="Edges", width=260, height=300),
        *txt2img_nodes(
            "a girl in a pink dress standing on a green hill under a blue sky, storybook illustration",
            "blurry, lowres, watermark",
            col=1,
            seed=42,
        ),
        Node("controlnet", "ControlNetLoader", 1, {"control_net_name": model_files.CONTROLNET_NAME}, width=380),
        Node("apply", "ControlNetApplyAdvanced", 2,
             {"strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}),
        Node("save_txt2img", "SaveImage", 4, {"filename_prefix": "ip2p/controlnet"}, width=300, height=330),
        *ip2p_chain(1, "make it a sunset with a golden sky", seed=11, band=1),
        Node("save_edit", "SaveImage", 3, {"filename_prefix": "ip2p/controlnet_edited"}, width=300, height=330, band=1),
        note(
            "note",
            0,
            "**ControlNet mix.** A Canny ControlNet makes SD1.5 follow the outlines of the loaded picture; "
            "InstructPix2Pix then edits the result by instruction, keeping its composition.",
            width=260,
            height=170,
        ),
    ]
    # The KSampler sits one column further right than in txt2img_nodes, after the ControlNet apply node.
    for n in nodes:
        if n.key in ("ksampler", "decode"):
            n.col = 3
    links = [
        ("image", "IMAGE", "canny", "image"),
        ("canny", "IMAGE", "edges", "images"),
        ("ckpt", "CLIP", "positive", "clip"),
        ("ckpt", "CLIP", "negative", "clip"),
        ("positive", "CONDITIONING", "apply", "positive"),
        ("negative", "CONDITIONING", "apply", "negative"),
        ("controlnet", "CONTROL_NET", "apply", "control_net"),
        ("canny", "IMAGE", "apply", "image"),
        ("ckpt", "VAE", "apply", "vae"),
        ("ckpt", "MODEL", "ksampler", "model"),
        ("apply", "positive", "ksampler", "positive"),
        ("apply", "negative", "ksampler", "negative"),
        ("latent", "LATENT", "ksampler", "latent_image"),
        ("ksampler", "LATENT", "decode", "samples"),
        ("ckpt", "VAE", "decode", "vae"),
        ("decode", "IMAGE", "save_txt2img", "images"),
        *IP2P_LINKS,
        ("decode", "IMAGE", "edit", "image"),
        ("edit", "image", "save_edit", "images"),
    ]
    groups = [
        Group("1 · ControlNet text to image (SD1.5 + Canny)",
              ["ckpt", "controlnet", "positive", "negative", "latent", "apply", "ksampler", "decode", "save_txt2img"],
              GROUP_COLORS["native"]),
        Group("2 · Instruction edit (InstructPix2Pix)", ["ip2p_model", "instruction", "edit", "save_edit"],
              GROUP_COLORS["ip2p"]),
    ]
    return Workflow("controlnet_edit", nodes, links, groups)


def controlnet_guided_edit() -> Workflow:
    chain = ip2p_chain(1, "turn it into a snowy winter scene", seed=11)
    for n in chain:
        if n.key == "edit":
            n.col = 3  # after the ControlNet, which sits between the instruction and the sampler
    return Workflow(
        "controlnet_guided_edit",
        nodes=[
            Node("image", "LoadImage", 0, {"image": "example.png"}, title="Load Image (your picture)"),
            Node("canny", "Canny", 0, {"low_threshold": 0.4, "high_threshold": 0.8}),
            Node("edges", "PreviewImage", 0, title="Edges", width=260, height=300),
            *chain,
            Node("apply", "IP2PApplyControlNet", 2,
                 {"control_net": model_files.CONTROLNET_NAME, "strength": 1.0, "start": 0.0, "end": 1.0}, width=340),
            Node("save", "SaveImage", 4, {"filename_prefix": "ip2p/controlnet_guided"}, width=360, height=400),
            note(
                "note",
                2,
                "**ControlNet-guided edit.** The Canny edges of the picture steer the InstructPix2Pix edit through "
                "an SD1.5 Canny ControlNet, so the edit keeps the picture's outlines.\n\n"
                "* **strength** (0.5-1): how firmly the edges hold; 0 turns the ControlNet off.\n"
                "* **start / end**: the part of the steps it steers; end 0.5-0.8 leaves fine detail free.\n\n"
                "Models: `instruct-pix2pix-00-22000.safetensors` in `models/instructpix2pix/`, "
                "`control_v11p_sd15_canny_fp16.safetensors` in `models/controlnet/`.",
                width=340,
                height=260,
            ),
        ],
        links=[
            ("image", "IMAGE", "canny", "image"),
            ("canny", "IMAGE", "edges", "images"),
            ("ip2p_model", "model", "instruction", "model"),
            ("ip2p_model", "model", "edit", "model"),
            ("instruction", "conditioning", "apply", "conditioning"),
            ("canny", "IMAGE", "apply", "image"),
            ("apply", "conditioning", "edit", "conditioning"),
            ("image", "IMAGE", "edit", "image"),
            ("edit", "image", "save", "images"),
        ],
    )


def toy_demo() -> Workflow:
    # The toy model's best text guidance in its evaluation (pipeline_core.demo.TOY_TEXT_GUIDANCE); 7.5
    # over-saturates it.
    return Workflow(
        "toy_demo",
        nodes=[
            Node("image", "LoadImage", 0, {"image": SAMPLE_IMAGE_NAME}, title="Load Image (toy-sample.png)",
                 width=300),
            *ip2p_chain(1, SAMPLE_INSTRUCTION, model=TOY_MODEL_CHOICE, text_guidance=3.0),
            Node("save", "SaveImage", 3, {"filename_prefix": "ip2p/toy_edit"}, title="Save Image (32 x 32)",
                 width=260, height=300),
            Node("enlarge", "ImageScaleBy", 3, {"upscale_method": "nearest-exact", "scale_by": 8.0},
                 title="Enlarge x8 for viewing"),
            Node("save_big", "SaveImage", 4, {"filename_prefix": "ip2p/toy_edit_x8"}, title="Save Image (x8)",
                 width=300, height=360),
            note(
                "note",
                0,
                "**Toy demo: runs with no model download.** The pack's embedded toy InstructPix2Pix model (10 MB) "
                "knows only 32 x 32 pictures of coloured shapes.\n\n"
                "**Input:** `toy-sample.png`, which the pack copies into `ComfyUI/input/` when ComfyUI starts "
                "(it ships in `custom_nodes/ip2p-nodes/pipeline_core/models/`). Any 32 x 32 shapes picture works.\n\n"
                "Try also: *make the circle green*, *turn the circle into a square*, *remove the triangle*, "
                "*add a purple star*, *make it darker* (colours: red, green, blue, yellow, purple). It works best "
                "at text guidance 3, image guidance 1.5. For real pictures use the *Basic instruction edit* template "
                "with a real InstructPix2Pix model.",
                width=380,
                height=260,
            ),
        ],
        links=[
            *IP2P_LINKS,
            ("image", "IMAGE", "edit", "image"),
            ("edit", "image", "save", "images"),
            ("edit", "image", "enlarge", "image"),
            ("enlarge", "IMAGE", "save_big", "images"),
        ],
        result_thumbnail="ip2p/toy_edit",
    )


# CosXL Edit's own settings, as in ComfyUI's CosXL example: DualCFG 5.0 / 1.5, euler, 20 steps.
COSXL_TEXT_GUIDANCE = 5.0
COSXL_MASK_SIZE = 768  # example.png's size; the sampler scales a mask of another size to the picture


def cosxl_edit() -> Workflow:
    return Workflow(
        "cosxl_edit",
        nodes=[
            Node("image", "LoadImage", 0, {"image": "example.png"}, title="Load Image (your picture)"),
            note(
                "note",
                0,
                "**CosXL Edit, masked.** Stability AI's CosXL Edit (an SDXL InstructPix2Pix model) changes the "
                "picture by instruction, only inside the mask: here the top of the picture. Move or resize the "
                "area in the *Mask* nodes, or paint one: right-click *Load Image* > *Open in MaskEditor* and "
                "connect its MASK output to the sampler's mask instead.\n\n"
                "**Model:** `cosxl_edit.safetensors` (6.9 GB) from huggingface.co/stabilityai/cosxl (accept the "
                "licence there first), into `ComfyUI/models/checkpoints/` (or `models/instructpix2pix/`); then "
                "press R.\n\n"
                "CosXL's own settings: text guidance 5, image guidance 1.5, scheduler euler, 20 steps.",
                width=380,
                height=250,
            ),
            Node("mask_canvas", "SolidMask", 1,
                 {"value": 0.0, "width": COSXL_MASK_SIZE, "height": COSXL_MASK_SIZE}, title="Mask: whole picture"),
            Node("mask_area", "SolidMask", 1, {"value": 1.0, "width": COSXL_MASK_SIZE, "height": 300},
                 title="Mask: area to edit"),
            Node("mask", "MaskComposite", 1, {"x": 0, "y": 0, "operation": "add"}, title="Mask: place the area"),
            *ip2p_chain(2, "make it a starry night sky", model=model_files.COSXL_NAME,
                        text_guidance=COSXL_TEXT_GUIDANCE, scheduler="euler", feather=16),
            Node("save", "SaveImage", 4, {"filename_prefix": "ip2p/cosxl_edit"}, width=360, height=400),
        ],
        links=[
            *IP2P_LINKS,
            ("image", "IMAGE", "edit", "image"),
            ("mask_canvas", "MASK", "mask", "destination"),
            ("mask_area", "MASK", "mask", "source"),
            ("mask", "MASK", "edit", "mask"),
            ("edit", "image", "save", "images"),
        ],
        groups=[Group("Mask: 1 = edit here", ["mask_canvas", "mask_area", "mask"], GROUP_COLORS["inpaint"])],
    )


WORKFLOWS = {
    w.__name__: w
    for w in (basic_edit, txt2img_edit_inpaint, guidance_sweep, batch_edit, controlnet_edit, toy_demo, cosxl_edit,
              controlnet_guided_edit)
}
assert list(WORKFLOWS) == example_workflows.KEYS, "every shipped workflow has a spec and a title"


def spec_json(workflow: Workflow, core_version: str) -> dict:
    """The spec as the page script takes it, with the properties ComfyUI-Manager would write."""
    nodes = []
    for n in workflow.nodes:
        properties = {}
        if n.type.startswith("IP2P"):
            properties = {"cnr_id": PACK_ID, "ver": PACK_VERSION}
        elif n.type not in workflow_format.FRONTEND_ONLY_NODES:
            properties = {"cnr_id": "comfy-core", "ver": core_version}
        model_widget = MODEL_WIDGETS.get(n.type)
        # The embedded toy model ships with the pack: no file to fetch, so no download link.
        if model_widget and n.widgets[model_widget] in MODEL_URLS:
            name = n.widgets[model_widget]
            directory, url = MODEL_URLS[name]
            properties["models"] = [{"name": name, "url": url, "directory": directory}]
        nodes.append(
            {"key": n.key, "type": n.type, "band": n.band, "col": n.col, "widgets": n.widgets, "title": n.title,
             "width": n.width, "height": n.height, "properties": properties}
        )
    groups = [{"title": g.title, "keys": g.keys, "color": g.color} for g in workflow.groups]
    return {"name": workflow.name, "nodes": nodes, "links": workflow.links, "groups": groups}


BUILD_JS = Path(__file__).with_name("build_graph.js").read_text()


def check_layout(page, name: str) -> None:
    """Refuse a layout in which nodes overlap or straddle a group, as the app shows it."""
    browser_harness.wait_for_image_previews(page)
    problems = workflow_layout.layout_problems(*workflow_layout.boxes_from_page(browser_harness.layout(page)))
    if problems:
        raise SystemExit(f"{name}: the layout is not clean:\n" + "\n".join(problems))


THUMBNAIL_SIZE = 512  # px, square: the Templates browser fits each thumbnail into a square
BACKGROUND = (32, 32, 32)


def result_thumbnail(before: Path, after: Path, instruction: str, path: Path) -> Path:
    """A square picture of the edit: input and result side by side, enlarged without smoothing, the instruction
    above them."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    side, gap = 216, THUMBNAIL_SIZE - 2 * 216 - 2 * 24
    top = (THUMBNAIL_SIZE - side) // 2 + 10
    for x, picture in ((24, before), (24 + side + gap, after)):
        with Image.open(picture) as image:
            canvas.paste(image.convert("RGB").resize((side, side), Image.Resampling.NEAREST), (x, top))

    def centred(text: str, y: int, size: int, fill=(235, 235, 235), x: float = THUMBNAIL_SIZE / 2) -> None:
        font = ImageFont.load_default(size=size)
        draw.text((x, y), text, font=font, fill=fill, anchor="mm")

    centred(f"\u201c{instruction}\u201d", top // 2 + 10, 34)
    # An arrow from input to result (drawn: Pillow's bundled font has no arrow glyph).
    mid_x, mid_y = THUMBNAIL_SIZE / 2, top + side / 2
    draw.line((mid_x - 10, mid_y, mid_x + 4, mid_y), fill=(235, 235, 235), width=4)
    draw.polygon(((mid_x + 12, mid_y), (mid_x + 2, mid_y - 8), (mid_x + 2, mid_y + 8)), fill=(235, 235, 235))
    centred("input", top + side + 30, 22, (170, 170, 170), 24 + side / 2)
    centred("result", top + side + 30, 22, (170, 170, 170), 24 + side + gap + side / 2)
    canvas.save(path, quality=90)
    return path


def run_for_thumbnail(server, workflow: dict, spec: Workflow, object_info: dict, out: Path) -> Path:
    """Run the saved workflow as shipped and make its thumbnail from the result it saves."""
    entry = server.run_prompt(workflow_format.to_api_prompt(workflow, object_info), timeout=600)
    nodes = workflow["nodes"]
    [save] = [n for n in nodes if n["type"] == "SaveImage" and n["widgets_values"][0] == spec.result_thumbnail]
    [image] = [n for n in nodes if n["type"] == "LoadImage"]
    [instruction] = [n for n in nodes if n["type"] == "IP2PInstruction"]
    [result] = server.output_files(entry, str(save["id"]))
    before = server.input_dir / image["widgets_values"][0]
    return result_thumbnail(before, result, instruction["widgets_values"][0], out)


def build(names: list[str], out_dir: Path) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="ip2p-build-") as tmp:
        tmp = Path(tmp)
        folders = model_files.write_model_tree(tmp / "models")
        with comfy_harness.comfy_server(tmp / "comfy", {key: [path] for key, path in folders.items()}) as server:
            # The pictures the Load Image nodes name, as a user has them: ComfyUI's bundled example (the toy
            # sample is put there by the pack itself). The layout is made around their previews.
            shutil.copyfile(comfy_harness.comfyui_dir() / "input" / "example.png", server.input_dir / "example.png")
            core_version = server.get_json("/system_stats")["system"]["comfyui_version"]
            object_info = server.object_info()
            with sync_playwright() as pw:
                browser = browser_harness.launch(pw)
                page = browser_harness.open_app(browser, server)
                for name in names:
                    spec = WORKFLOWS[name]()
                    page.evaluate(BUILD_JS, spec_json(spec, core_version))
                    check_layout(page, name)
                    text = browser_harness.export_workflow(page)
                    (out_dir / f"{spec.title}.json").write_text(text)
                    thumbnail = out_dir / f"{spec.title}.jpg"
                    if spec.result_thumbnail:
                        run_for_thumbnail(server, json.loads(text), spec, object_info, thumbnail)
                    else:
                        browser_harness.screenshot_graph(page, thumbnail)
                    log.info("wrote %s.json and %s.jpg", spec.title, spec.title)
                browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"workflows to rebuild, by key (default: all: {', '.join(WORKFLOWS)})")
    parser.add_argument("--out", type=Path, default=WORKFLOW_DIR)
    args = parser.parse_args()
    unknown = set(args.names) - set(WORKFLOWS)
    if unknown:
        parser.error(f"unknown workflow(s) {', '.join(sorted(unknown))}; choose from {', '.join(WORKFLOWS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    build(args.names or list(WORKFLOWS), args.out)


if __name__ == "__main__":
    main()
