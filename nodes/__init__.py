"""ComfyUI glue: V3 node classes that convert ComfyUI types and call ``pipeline_core``.

Every module here may import ComfyUI (``comfy``, ``folder_paths``, ``comfy_api``); this package file does not,
so ``import ip2p_nodes.nodes`` outside ComfyUI stays harmless. Imports are relative, so the pack works from any
folder name under ``custom_nodes/``.
"""
