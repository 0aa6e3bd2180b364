"""The ComfyUI web app in headless Chromium, for tests and for ``tools/build_workflows.py``.

Uses Playwright's Python package with the system's Chromium (Debian ``chromium``); it never downloads a
browser. Tests skip, saying what is missing, when either is absent: this module installs nothing.

What a user does is done the user's way: a workflow is opened through the app's file input
(``#comfy-file-input``, the same path as drag and drop), saved with the app's *Export* command, and the app's
own dialogs and toasts are read from the page to see what the user would be shown.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_ENV = "IP2P_CHROMIUM"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# No sandbox: test containers run as root; the rest keeps a headless run quiet and offline.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
VIEWPORT = {"width": 1600, "height": 1000}

# Settings of a user who has used the app before: no first-run template browser, no file-name prompt on
# export; and a clean canvas for screenshots (no minimap, no render statistics, no pack-folder badges, which
# would show the test's folder name).
APP_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.PromptFilename": False,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.NodeBadge.NodeSourceBadgeMode": "None",
    # Draw node text even when a big graph is zoomed out to fit a screenshot.
    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.2,
}


def find_chromium() -> str | None:
    for candidate in (os.environ.get(CHROMIUM_ENV), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def browser_missing() -> str | None:
    """Why the browser tier cannot run here, or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "needs the playwright package (pip install playwright; no browser download needed)"
    if find_chromium() is None:
        return f"needs a Chromium binary (apt-get install chromium, or set {CHROMIUM_ENV})"
    return None


def _requires_browser():
    reason = browser_missing()
    return pytest.mark.skipif(reason is not None, reason=reason or "")


requires_browser = _requires_browser()
"""Marks a test that needs Playwright and Chromium: skipped (with the reason) before any fixture starts."""


def skip_without_browser() -> None:
    reason = browser_missing()
    if reason:
        pytest.skip(reason)


def launch(playwright):
    return playwright.chromium.launch(executable_path=find_chromium(), args=list(CHROMIUM_ARGS), headless=True)


def open_app(browser, server, timeout_ms: int = 90_000):
    """A page with the ComfyUI app of ``server`` loaded and its node definitions registered."""
    for key, value in APP_SETTINGS.items():
        status, body = server.request("POST", f"/settings/{key}", value)
        if status != 200:
            raise AssertionError(f"POST /settings/{key} -> {status}: {body}")
    page = browser.new_page(viewport=VIEWPORT, accept_downloads=True)
    page.goto(server.base_url + "/", timeout=timeout_ms)
    page.wait_for_function(
        "() => window.app?.graph && window.LiteGraph && Object.keys(LiteGraph.registered_node_types).length > 100",
        timeout=timeout_ms,
    )
    page.wait_for_selector("#comfy-file-input", state="attached", timeout=timeout_ms)
    return page


def load_workflow_file(page, path: Path) -> None:
    """Open a workflow file the way drag and drop does: through the app's hidden file input.

    Starts from a new blank workflow, so "the graph has nodes" means "the file was loaded".
    """
    page.evaluate("() => app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
    page.wait_for_function("() => app.graph.nodes.length === 0")
    page.set_input_files("#comfy-file-input", str(path))
    page.wait_for_function("() => app.graph.nodes.length > 0")
    page.wait_for_timeout(1000)  # dialogs and toasts are shown after the graph is configured


IMAGE_PREVIEWS_JS = """() => app.graph.nodes
    .filter((n) => n.widgets?.some((w) => w.name === 'upload'))
    .filter((n) => !(n.imgs?.length && n.imgs.every((img) => img.complete && img.naturalWidth > 0)))
    .map((n) => `#${n.id} ${n.title}: ${n.widgets.find((w) => w.name === 'image')?.value}`)"""


def wait_for_image_previews(page, timeout_ms: int = 30_000, settle_ms: int = 400) -> None:
    """Wait until every picture-loading node (Load Image) shows its picture, and node sizes stop changing.

    The app grows a Load Image node to fit its preview once the picture has loaded: the layout a user sees
    is only there after that. Raises, naming the nodes, when a picture never renders (missing file).
    """
    try:
        page.wait_for_function(f"() => ({IMAGE_PREVIEWS_JS})().length === 0", timeout=timeout_ms)
    except Exception as exc:  # playwright's TimeoutError; say which pictures are missing
        pending = page.evaluate(IMAGE_PREVIEWS_JS)
        raise AssertionError(f"no picture preview rendered for: {pending}") from exc
    sizes = "() => JSON.stringify(app.graph.nodes.map((n) => [n.id, ...n.pos, ...n.size]))"
    previous = None
    for _ in range(50):
        page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
        current = page.evaluate(sizes)
        if current == previous:
            return
        previous = current
        page.wait_for_timeout(settle_ms)
    raise AssertionError("node sizes kept changing after the picture previews rendered")


def layout(page) -> dict:
    """Every node's drawn box (title bar included) and every group's box, in graph units.

    ``{"nodes": [{id, type, title, x, y, w, h}], "groups": [{title, x, y, w, h, title_height}]}``.
    """
    return page.evaluate(
        """() => {
            const title = LiteGraph.NODE_TITLE_HEIGHT
            const nodes = app.graph.nodes.map((n) => ({
                id: n.id, type: n.type, title: n.title, x: n.pos[0], y: n.pos[1] - title,
                w: n.flags?.collapsed ? (n._collapsed_width ?? n.size[0]) : n.size[0],
                h: n.flags?.collapsed ? title : n.size[1] + title,
            }))
            const groups = app.graph.groups.map((g) => ({
                title: g.title, x: g.pos[0], y: g.pos[1], w: g.size[0], h: g.size[1],
                title_height: g.titleHeight ?? (g.font_size ?? 24) * 1.4,
            }))
            return {nodes, groups}
        }"""
    )


def shown_messages(page) -> dict[str, list[str]]:
    """Texts of the dialogs and the toasts the app is showing right now."""
    return page.evaluate(
        """() => {
            const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length)
            const texts = (sel) => [...document.querySelectorAll(sel)].filter(visible)
                .map((el) => el.innerText.trim().replace(/\\s+/g, ' ')).filter(Boolean)
            return {dialogs: texts('[role=dialog]'), toasts: texts('.p-toast-message')}
        }"""
    )


def dismiss_messages(page) -> None:
    """Close every dialog and toast, the way a user would, so the next check starts clean."""
    for selector in (".p-toast-message .p-toast-close-button", "[role=dialog] .p-dialog-close-button"):
        buttons = page.locator(selector)
        for _ in range(20):
            if not buttons.count():
                break
            # Dispatched on the button itself: a toast sliding in can sit under the app's toolbar mid-animation.
            buttons.first.dispatch_event("click")
            page.wait_for_timeout(300)
    page.wait_for_function(
        "() => !document.querySelector('.p-toast-message') && !document.querySelector('[role=dialog]')"
    )


def export_workflow(page) -> str:
    """The current graph as the app's *Export* command saves it (UI format), as text."""
    with page.expect_download() as download:
        page.evaluate("() => app.extensionManager.command.execute('Comfy.ExportWorkflow')")
    return Path(download.value.path()).read_text()


def graph_to_prompt(page) -> dict:
    """What the app's Run button would send: ``{"output": api prompt, "workflow": ui graph}``."""
    return page.evaluate("async () => JSON.parse(JSON.stringify(await window.app.graphToPrompt()))")


def screenshot_graph(page, path: Path, quality: int = 85, margin: int = 24) -> Path:
    """The whole graph, fitted and cropped to its bounds, without the app's menus and panels over it.

    The window is first given the graph's aspect ratio so the fitted graph fills it. Only the canvas and the
    widgets drawn as page elements (text boxes, notes) stay visible.
    """
    bounds_js = """() => {
        const boxes = [...app.graph.nodes.map((n) => n.boundingRect), ...app.graph.groups.map((g) => g.boundingRect)]
        const x0 = Math.min(...boxes.map((b) => b[0])), y0 = Math.min(...boxes.map((b) => b[1]))
        const x1 = Math.max(...boxes.map((b) => b[0] + b[2])), y1 = Math.max(...boxes.map((b) => b[1] + b[3]))
        const {scale, offset} = app.canvas.ds
        const r = app.canvas.canvas.getBoundingClientRect()
        return {w: x1 - x0, h: y1 - y0, left: r.left + (x0 + offset[0]) * scale, top: r.top + (y0 + offset[1]) * scale,
                width: (x1 - x0) * scale, height: (y1 - y0) * scale}
    }"""
    graph = page.evaluate(bounds_js)
    # About 0.8 px per graph unit keeps widget text readable in the picture.
    width = int(min(2400, max(1200, 0.8 * graph["w"] + 100)))
    page.set_viewport_size({"width": width, "height": int(min(1600, max(500, width * graph["h"] / graph["w"] + 120)))})
    page.wait_for_timeout(300)
    page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    style = page.add_style_tag(
        content=(
            "body * { visibility: hidden !important; } "
            "#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }"
        )
    )
    page.wait_for_timeout(500)
    box = page.evaluate(bounds_js)
    viewport = page.viewport_size
    left, top = max(0, box["left"] - margin), max(0, box["top"] - margin)
    clip = {
        "x": left,
        "y": top,
        "width": min(viewport["width"], box["left"] + box["width"] + margin) - left,
        "height": min(viewport["height"], box["top"] + box["height"] + margin) - top,
    }
    kwargs = {"type": "jpeg", "quality": quality} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    page.screenshot(path=str(path), clip=clip, **kwargs)
    style.evaluate("(el) => el.remove()")
    page.set_viewport_size(VIEWPORT)
    return path
