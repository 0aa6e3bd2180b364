"""Every limit and default of an edit, declared once.

The core validates against these, the nodes build their widgets from them and the CLI its option defaults, so
a value one of them accepts the others accept too (ComfyUI does the same with ``MAX_RESOLUTION``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """A numeric setting: its bounds (inclusive), default and widget step."""

    low: float
    high: float
    default: float
    step: float = 1.0

    def __contains__(self, value) -> bool:
        return self.low <= value <= self.high


STEPS = Range(1, 500, 20)
# Guidance below 0 inverts the edit and has no use; above 30 every model saturates. Image guidance below 1 is
# allowed on purpose: it drifts away from the input, which diffusers cannot do at all.
TEXT_GUIDANCE = Range(0.0, 30.0, 7.5, 0.1)
IMAGE_GUIDANCE = Range(0.0, 30.0, 1.5, 0.05)
# Edit strength: the fraction of the schedule that is run. A strength that rounds to zero steps still runs the
# last one, so the floor only keeps the widget sensible.
DENOISE = Range(0.01, 1.0, 1.0, 0.01)
SEED = Range(0, 2**64 - 1, 0)
FEATHER = Range(0, 1024, 0)
MAX_BATCH = Range(1, 64, 4)
PLAN_ITEMS = 256
# ControlNet: strength multiplies its residuals (above 2 they swamp the edit); start/end are fractions of the
# schedule (see pipeline_core/editing/control.py).
CONTROL_STRENGTH = Range(0.0, 2.0, 1.0, 0.01)
CONTROL_START = Range(0.0, 1.0, 0.0, 0.01)
CONTROL_END = Range(0.0, 1.0, 1.0, 0.01)
# Speed: "quality" runs the whole UNet on every step; "fast" reuses its deep features across steps (DeepCache,
# see pipeline_core/editing/step_cache.py): one full step of every FAST_INTERVAL (and the last), the others
# cached. Interval 1 is quality. The default is the largest that keeps the toy model's held-out success at its
# own text guidance (3) within 3 points of quality (300 triplets: interval 2 -1, and -7 at the paper's 7.5;
# the previous toy model: interval 2 0 / -2, interval 3 -4 / -26 at text guidance 3 / 7.5); a full
# SD1.5 UNet keeps far more of its work outside the cached path and may take more (DeepCache runs it at 3-5).
SPEEDS = ("quality", "fast")
FAST_INTERVAL = Range(1, 10, 2)
# Device memory: "low" keeps one model part on the device at a time, runs the UNet one row at a time and the VAE
# in tiles (pipeline_core/editing/vram.py); "auto" picks it when the device reports too little free memory.
VRAM_MODES = ("auto", "normal", "low")

# Working resolution: the side of the square whose area the model edits at (0 = the model's own).
WORKING_RESOLUTION = Range(64, 4096, 0, 64)
MAX_WORKING_SIDE = 8192
# The full-resolution steps (resize back, detail restoration, mask blend) hold about five float copies of the
# picture; above this many pixels that alone is several GB.
MAX_INPUT_PIXELS = 2**27  # 134 MP, e.g. 11585 x 11585
# Below this many pixels on a side a picture carries too little for any IP2P model to read; it is still edited
# (padding makes it valid), with a warning.
MIN_USEFUL_SIDE = 16
