"""IP2P Labelled Grid: a batch of pictures as one contact sheet, each captioned with how it was made."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..pipeline_core.grid import MAX_COLUMNS, labelled_grid
from .types import CATEGORY


class IP2PImageGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PImageGrid",
            display_name="IP2P Labelled Grid",
            category=CATEGORY,
            description=(
                "Lays a batch of pictures out in one grid image, row by row, with each picture's label line "
                "written under it, so a sweep of seeds and guidance values can be compared at a glance and "
                "shared as one file."
            ),
            inputs=[
                io.Image.Input(
                    "images",
                    tooltip="The batch to lay out, e.g. the sampler's image output (all pictures share one size).",
                ),
                io.String.Input(
                    "labels",
                    force_input=True,
                    optional=True,
                    tooltip=(
                        "One line per picture, drawn under it: connect the sampler's labels output (seed, text "
                        "and image guidance of each picture). Unconnected: a grid without captions."
                    ),
                ),
                io.Int.Input(
                    "columns",
                    default=0,
                    min=0,
                    max=MAX_COLUMNS,
                    tooltip=(
                        "Pictures per row. 0 picks a near-square grid; for a sweep, the number of image guidance "
                        "values puts each setting in its own column."
                    ),
                ),
                io.Int.Input(
                    "font_size",
                    default=0,
                    min=0,
                    max=128,
                    tooltip=(
                        "Caption text height in pixels. 0 sizes it to the pictures (1/24 of their width: 21 px "
                        "at 512). Long captions wrap to stay under their picture."
                    ),
                ),
                io.Int.Input(
                    "gap",
                    default=4,
                    min=0,
                    max=64,
                    tooltip="White space between cells in pixels (0-16 is typical).",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="image",
                    tooltip="One picture: the grid on white, black captions; save or preview it like any image.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls, images: torch.Tensor, columns: int, font_size: int, gap: int, labels: str | None = None
    ) -> io.NodeOutput:
        return io.NodeOutput(labelled_grid(images, labels, columns=columns, font_size=font_size, gap=gap))
