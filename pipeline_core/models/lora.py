"""LoRA files applied to a loaded model, through peft, the way diffusers' pipelines load them.

A file is read once per model (kohya/A1111 keys are converted by diffusers' own converter, the family's
``lora_state_dict``), checked against the model's modules *before* anything is injected, then loaded as one named
peft adapter into the UNet and the text encoders it has keys for. Strength is the adapter's weight
(``set_adapters``), so changing it — or switching between LoRA stacks that share files — never touches the base
weights nor reads the file again. A stack with nothing at non-zero strength disables the adapters: the model is
then exactly the base model.

Text-encoder LoRA goes through transformers' own peft integration (``load_adapter``), which needs peft >= 0.20
with transformers 5. transformers 5 also dropped CLIPTextModel's ``text_model.`` level, which every LoRA file in
the wild (kohya's ``lora_te_text_model_...``, diffusers' ``text_encoder.text_model...``) still names; keys are
mapped to the module names the loaded text encoder really has before loading.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import InputError
from .components import IP2PComponents

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
STRENGTH_RANGE = (-4.0, 4.0)
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_LYCORIS_MARKERS = ("hada_w1", "lokr_w1", ".oft_", "lora_mid.")  # LoHa / LoKr / OFT / LoCon-mid: not LoRA


@dataclass(frozen=True)
class LoraRef:
    """One LoRA file at one strength, as a model cache key holds it.

    ``fingerprint`` (size and modification time) makes a rewritten file a different key, so it is read again.
    """

    path: str
    strength: float = 1.0
    fingerprint: tuple[int, int] = (0, 0)

    @classmethod
    def of(cls, path: str | os.PathLike, strength: float = 1.0) -> "LoraRef":
        """A checked reference: the file exists, is a file, has a weights suffix, and the strength is usable."""
        p = Path(path).expanduser()
        if not p.exists():
            raise InputError(f"LoRA file not found: {p}")
        if not p.is_file():
            raise InputError(f"LoRA path is not a file: {p}")
        if p.suffix.lower() not in LORA_SUFFIXES:
            raise InputError(f"{p.name}: not a LoRA weights file (expected one of {', '.join(LORA_SUFFIXES)})")
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            raise InputError(f"{p.name}: LoRA strength must be a number, got {strength!r}") from None
        if not (STRENGTH_RANGE[0] <= strength <= STRENGTH_RANGE[1]) or strength != strength:
            low, high = STRENGTH_RANGE
            raise InputError(f"{p.name}: LoRA strength {strength} is outside {low:g}..{high:g}")
        st = p.stat()
        return cls(str(p.resolve()), strength, (st.st_size, st.st_mtime_ns))

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def file_key(self) -> tuple[str, tuple[int, int]]:
        """What identifies the file's contents, whatever the strength."""
        return self.path, self.fingerprint

    def describe(self) -> str:
        return f"{self.name}@{self.strength:g}"


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]`` as the CLI takes it. A tail that is not a number belongs to the path (``C:\\x``)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def adapter_name(ref: LoraRef) -> str:
    """A stable peft adapter name per file contents (peft names may not contain dots)."""
    digest = hashlib.sha1(repr(ref.file_key).encode()).hexdigest()[:10]
    stem = re.sub(r"[^0-9A-Za-z_]", "_", Path(ref.path).stem)[:40]
    return f"lora_{stem}_{digest}"


# ------------------------------------------------------------------------------------------------ reading


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The file's tensors and diffusers' adapter metadata (peft's LoraConfig per component: rank, alpha, targets).

    Pickles only with ``weights_only=True``: a LoRA file never needs code.
    """
    try:
        if path.suffix.lower() == ".safetensors":
            from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            raw = header.get(LORA_ADAPTER_METADATA_KEY)
            return state, (json.loads(raw) if raw else None)
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise InputError(f"{path.name}: cannot be read as a LoRA file ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path.name}: not a LoRA file (no table of tensors inside)")
    return state, None


def detect_format(state: Mapping[str, torch.Tensor], name: str) -> str:
    """"kohya" (A1111/kohya-ss ``lora_unet_…``) or "diffusers" (``unet.``/``text_encoder.`` + lora_A/B, lora.up…)."""
    keys = list(state)
    if not keys:
        raise InputError(f"{name}: the file holds no tensors")
    if any(marker in k for k in keys for marker in _LYCORIS_MARKERS):
        raise InputError(f"{name}: a LyCORIS (LoHa/LoKr/OFT) file; only plain LoRA files are supported")
    if all(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if all(k.split(".", 1)[0] in ("unet", "text_encoder", "text_encoder_2") for k in keys) and any(
        "lora" in k for k in keys
    ):
        return "diffusers"
    model_heads = ("model.diffusion_model.", "first_stage_model.", "conditioner.", "cond_stage_model.")
    if any(k.startswith(model_heads) for k in keys):
        raise InputError(f"{name}: a full model checkpoint, not a LoRA; load it with IP2P Load Model")
    sample = ", ".join(keys[:3])
    raise InputError(
        f"{name}: not a LoRA in a format this pack reads (kohya/A1111 'lora_unet_…' or diffusers/peft "
        f"'unet.…lora_A'); its keys begin: {sample}"
    )


def _text_module_prefix(text_encoder: torch.nn.Module) -> str:
    """'text_model.' on CLIP text encoders that still have that level (transformers 4), '' otherwise."""
    return "text_model." if hasattr(text_encoder, "text_model") else ""


def _retarget_text_keys(state: dict[str, Any] | None, component: str, text_encoder) -> dict[str, Any] | None:
    """Name text-encoder keys after the loaded encoder's modules (files name transformers 4's ``text_model.``)."""
    if not state or text_encoder is None or _text_module_prefix(text_encoder):
        return state
    head = f"{component}.text_model."
    return {(f"{component}." + k[len(head):] if k.startswith(head) else k): v for k, v in state.items()}


@dataclass
class LoraLayers:
    """A converted file, split by the module it belongs to, with what it matched."""

    state: dict[str, torch.Tensor]  # diffusers keys, ``<component>.<module path>…``
    network_alphas: dict[str, float] | None
    metadata: dict | None
    components: tuple[str, ...]  # the model modules it has keys for: unet, text_encoder, text_encoder_2


def _peft_layers(state: Mapping[str, torch.Tensor], component: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``module path -> (lora_A [r,in...], lora_B [out,r...])`` for one component.

    Keys are first put in peft's form by the converters diffusers itself runs before injecting (old attention-
    processor names like ``processor.to_k_lora.down``, ``lora_linear_layer``, ``lora.down``), so the check sees
    exactly the layers diffusers will load.
    """
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    head = component + "."
    part = {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
    if not part:
        return {}
    if component == "unet":
        part = convert_unet_state_dict_to_peft(part)
    else:
        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    down = {k[: -len(".lora_A.weight")]: v for k, v in part.items() if k.endswith(".lora_A.weight")}
    up = {k[: -len(".lora_B.weight")]: v for k, v in part.items() if k.endswith(".lora_B.weight")}
    return {m: (down[m], up.get(m, down[m].new_zeros(0, 0))) for m in down}


def _fits(module: torch.nn.Module, down: torch.Tensor, up: torch.Tensor) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or up.dim() < 2:
        return False
    return int(down.shape[1]) == int(weight.shape[1]) and int(up.shape[0]) == int(weight.shape[0])


def read_lora(ref: LoraRef, components: IP2PComponents) -> LoraLayers:
    """Read, convert and check a LoRA file against ``components``; raises :class:`InputError` naming what matched.

    Every layer in the file must land on a module of this model with the same shapes: a file for another family
    (SD1.5 LoRA on an SDXL model) matches few or none, and a partial load would silently be a different LoRA.
    """
    path = Path(ref.path)
    raw, metadata = read_state_dict(path)
    kind = detect_format(raw, path.name)
    loader = components.spec.lora_loader
    try:
        state, alphas = loader.lora_state_dict(raw, unet_config=components.unet.config)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"{path.name}: a {kind}-format LoRA diffusers cannot convert: {exc}") from None
    modules = components.modules()
    for name in ("text_encoder", "text_encoder_2"):
        state = _retarget_text_keys(state, name, modules.get(name))
        alphas = _retarget_text_keys(alphas, name, modules.get(name))

    total = fitted = 0
    found: list[str] = []
    first_miss = None
    owners = {k.split(".", 1)[0] for k in state}
    unknown = owners - set(modules) - {"vae"}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        layers = _peft_layers(state, component)
        if not layers:
            continue
        module = modules.get(component)
        named = dict(module.named_modules()) if module is not None else {}
        ok = 0
        for path_in_module, (down, up) in layers.items():
            target = named.get(path_in_module)
            if target is not None and _fits(target, down, up):
                ok += 1
            elif first_miss is None:
                why = "no such layer" if target is None else (
                    f"LoRA shape {int(up.shape[0])}x{int(down.shape[1])}, the layer's "
                    f"{int(target.weight.shape[0])}x{int(target.weight.shape[1])}")
                first_miss = f"{component}.{path_in_module} ({why})"
        total += len(layers)
        fitted += ok
        if ok:
            found.append(component)
    family = components.spec.label
    if total == 0 or unknown and not found:
        raise InputError(
            f"{path.name}: no LoRA layers for this {family} model's UNet or text encoders "
            f"(the file names {', '.join(sorted(owners)) or 'nothing'})"
        )
    if fitted < total:
        raise InputError(
            f"{path.name}: {fitted} of its {total} LoRA layers fit this {family} model; it was made for another "
            f"model (first that does not fit: {first_miss}). Use a LoRA trained for {family}."
        )
    log.info("ip2p: LoRA %s (%s format): %d layers on %s", path.name, kind, total, ", ".join(found))
    return LoraLayers(state, alphas, metadata, tuple(found))


# ------------------------------------------------------------------------------------------------ applying


@contextlib.contextmanager
def _quiet_adapter_loading():
    """Hide what transformers and peft say about a second adapter in one module.

    Loading adapter B into a text encoder that holds adapter A makes transformers log a "LOAD REPORT" listing
    A's weights as "missing" (they are not in B's file, and need not be), and peft warn that the model already
    has adapters. Both are expected here; a user reading them would think the LoRA failed.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
            warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
            yield
    finally:
        hf_logging.set_verbosity(level)


class LoraState:
    """The adapters loaded into one model's modules, and which stack is active now."""

    def __init__(self):
        self.adapters: dict[tuple, tuple[str, tuple[str, ...]]] = {}  # file key -> (adapter, components)
        self.active: tuple[LoraRef, ...] | None = None

    def load(self, ref: LoraRef, components: IP2PComponents) -> None:
        """Inject ``ref``'s file as an adapter (once per file contents)."""
        if ref.file_key in self.adapters:
            return
        layers = read_lora(ref, components)
        name = adapter_name(ref)
        loader = components.spec.lora_loader
        modules = components.modules()
        try:
            with _quiet_adapter_loading():
                if "unet" in layers.components:
                    loader.load_lora_into_unet(layers.state, layers.network_alphas, modules["unet"], adapter_name=name,
                                               metadata=layers.metadata)
                for te in ("text_encoder", "text_encoder_2"):
                    if te in layers.components:
                        loader.load_lora_into_text_encoder(layers.state, layers.network_alphas, modules[te], prefix=te,
                                                           adapter_name=name,
                                                           metadata=layers.metadata)
        except Exception as exc:
            # A half-injected adapter would be active on the next run; take out whatever got in.
            self._delete(name, components)
            raise InputError(f"{Path(ref.path).name}: loading the LoRA failed ({type(exc).__name__}: {exc})") from exc
        self.adapters[ref.file_key] = (name, layers.components)
        self.active = None  # peft makes a freshly loaded adapter active: the next activate() must set it right

    def _delete(self, name: str, components: IP2PComponents) -> None:
        for module in components.modules().values():
            if name in (getattr(module, "peft_config", None) or {}):
                from peft.tuners.tuners_utils import BaseTunerLayer

                for sub in module.modules():
                    if isinstance(sub, BaseTunerLayer):
                        sub.delete_adapter(name)
                module.peft_config.pop(name, None)

    def activate(self, stack: tuple[LoraRef, ...], components: IP2PComponents) -> None:
        """Make exactly ``stack`` active at its strengths (loading files not seen yet)."""
        live = tuple(ref for ref in stack if ref.strength != 0.0)
        if self.active == live:
            return
        for ref in live:
            self.load(ref, components)
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        for component, module in components.modules().items():
            if component == "vae" or not getattr(module, "peft_config", None):
                continue
            names, weights = [], []
            for ref in live:
                adapter, where = self.adapters[ref.file_key]
                if component in where:
                    names.append(adapter)
                    weights.append(ref.strength)
            is_text = component.startswith("text_encoder")
            if not names:
                # No adapter runs: the module computes exactly its base function (strength 0 == no LoRA).
                if is_text:
                    disable_lora_for_text_encoder(module)
                else:
                    module.disable_adapters()
                continue
            if is_text:
                enable_lora_for_text_encoder(module)
                set_adapters_for_text_encoder(names, module, weights)
            else:
                module.enable_adapters()
                module.set_adapters(names, weights)
        self.active = live
        if live:
            log.info("ip2p: LoRA stack active: %s", ", ".join(ref.describe() for ref in live))


def describe_stack(stack: tuple[LoraRef, ...]) -> str:
    return " + ".join(ref.describe() for ref in stack)


__all__ = ["LoraRef", "LoraState", "LoraLayers", "parse_lora_arg", "read_lora", "describe_stack", "LORA_SUFFIXES",
           "STRENGTH_RANGE"]
