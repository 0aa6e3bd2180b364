"""Reading ComfyUI's UI workflow format (version 0.4) against a server's ``/object_info``.

The UI format stores a node's widget values as a plain list, in the order the frontend creates widgets: the
node's widget inputs in definition order (required, then optional), plus UI-only values the frontend inserts
after some of them (``control_after_generate`` after a seed, the upload button's value after an image
picker). This module pairs each value with its input, checks it the way ComfyUI's validation would, and
converts a workflow to the API prompt the frontend's *Run* sends. The browser tests compare this conversion
with the frontend's own ``graphToPrompt``, so the two cannot drift apart silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Node types that live only in the frontend: never in /object_info, dropped from API prompts.
FRONTEND_ONLY_NODES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@dataclass(frozen=True)
class WidgetSlot:
    """One widget input of a node definition and the UI-only values that follow it in ``widgets_values``."""

    name: str
    type: str
    options: dict
    extras: tuple[str, ...]  # names of UI-only values after it: "control_after_generate", "upload"


def input_specs(node_def: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of every input, in definition order; a list type (old-style combo) is COMBO."""
    specs = []
    inputs = node_def.get("input", {})
    order = node_def.get("input_order", {})
    for section in ("required", "optional"):
        entries = inputs.get(section, {})
        for name in order.get(section, list(entries)):
            spec = entries[name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list):
                kind, options = "COMBO", dict(options, options=kind)
            specs.append((name, kind, options))
    return specs


def socket_type(node_def: dict, input_name: str) -> str | None:
    """The type of input ``input_name``, including the numbered sockets of a growing input (``images.image2``)."""
    specs = {name: (kind, options) for name, kind, options in input_specs(node_def)}
    if input_name in specs:
        return specs[input_name][0]
    group, _, member = input_name.partition(".")
    kind, options = specs.get(group, (None, {}))
    if kind == "COMFY_AUTOGROW_V3":
        template = options["template"]
        prefix = template.get("prefix", "")
        if member.startswith(prefix) and member[len(prefix):].isdigit():
            (entry,) = [spec for section in template["input"].values() for spec in section.values()]
            return entry[0]
    return None


def widget_slots(node_def: dict) -> list[WidgetSlot]:
    slots = []
    for name, kind, options in input_specs(node_def):
        if kind not in WIDGET_TYPES or options.get("forceInput"):
            continue
        extras = []
        if options.get("control_after_generate"):
            extras.append("control_after_generate")
        if options.get("image_upload") or options.get("video_upload") or options.get("audio_upload"):
            extras.append("upload")
        slots.append(WidgetSlot(name, kind, options, tuple(extras)))
    return slots


def widget_values(node: dict, node_def: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """({input name: value}, {"<input>.<extra>": UI-only value}) of a UI node; raises on a count mismatch."""
    values = list(node.get("widgets_values") or [])
    slots = widget_slots(node_def)
    expected = sum(1 + len(s.extras) for s in slots)
    if len(values) != expected:
        raise ValueError(
            f"node {node['id']} ({node['type']}): {len(values)} widget values for {expected} widget slots "
            f"{[s.name for s in slots]}: the workflow was saved for another version of the node (for the pack's "
            "examples: rebuild them with tools/build_workflows.py)"
        )
    out, extras, i = {}, {}, 0
    for slot in slots:
        out[slot.name] = values[i]
        i += 1
        for extra in slot.extras:
            extras[f"{slot.name}.{extra}"] = values[i]
            i += 1
    return out, extras


def check_widget_value(slot: WidgetSlot, value: Any) -> str | None:
    """Why ComfyUI would refuse ``value`` for this input, or None if it is valid."""
    o = slot.options
    if slot.type == "COMBO":
        choices = o.get("options", [])
        return None if value in choices else f"{value!r} is not one of {choices}"
    if slot.type == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not an integer"
    elif slot.type == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
    elif slot.type == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not text"
    elif slot.type == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not true/false"
    if "min" in o and value < o["min"]:
        return f"{value} is below the minimum {o['min']}"
    if "max" in o and value > o["max"]:
        return f"{value} is above the maximum {o['max']}"
    return None


def links_by_id(workflow: dict) -> dict[int, list]:
    """``links`` rows ``[id, source node, source slot, target node, target slot, type]`` by id."""
    return {row[0]: row for row in workflow["links"]}


def types_match(output_type: str, input_type: str) -> bool:
    """ComfyUI's rule: equal types, a ``*`` on either end, or one of the comma-separated alternatives."""
    if "*" in (output_type, input_type):
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def to_api_prompt(workflow: dict, object_info: dict) -> dict[str, dict]:
    """The API prompt ``{node id: {"class_type", "inputs"}}`` of a UI workflow; frontend-only nodes dropped."""
    links = links_by_id(workflow)
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_NODES or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        node_def = object_info[node["type"]]
        inputs, _ = widget_values(node, node_def)
        for slot in node.get("inputs") or []:
            if slot.get("link") is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
