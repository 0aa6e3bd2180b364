"""ip2p-nodes: InstructPix2Pix editing nodes for ComfyUI.

Registration only. ComfyUI calls :func:`comfy_entrypoint`; importing this package anywhere else (pip
install, tests, scripts) loads nothing and changes nothing. No ``NODE_CLASS_MAPPINGS`` here on purpose:
ComfyUI skips ``comfy_entrypoint`` for modules that export one.
"""


async def comfy_entrypoint():
    from .nodes.extension import IP2PExtension

    return IP2PExtension()
