"""Test plumbing for a real ComfyUI checkout named by ``COMFYUI_DIR``: in-process imports and a live server.

ComfyUI is not on any package registry, so tests that need it take a checkout from the environment and skip,
saying so, without one. Two ways in:

- :func:`import_comfyui` makes ComfyUI's top-level modules (``comfy``, ``folder_paths``, ``nodes``, ...)
  importable in the test process, on the CPU, for tests that call node classes directly.
- :func:`comfy_server` starts ``main.py`` on a free loopback port in a throw-away base directory, with the pack
  linked into its ``custom_nodes`` and model folders from a temporary ``extra_model_paths.yaml``; it waits for
  ``/object_info``, offers the HTTP calls tests need, keeps the server log, and always kills the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

COMFYUI_ENV = "COMFYUI_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER_NAME = "ip2p-nodes-under-test"  # a name the pack cannot import itself by: relative imports only
SKIP_REASON = f"needs a ComfyUI checkout: set {COMFYUI_ENV} (e.g. {COMFYUI_ENV}=/opt/comfy/ComfyUI)"


def comfyui_dir() -> Path | None:
    value = os.environ.get(COMFYUI_ENV)
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file() or not (path / "nodes.py").is_file():
        raise RuntimeError(f"{COMFYUI_ENV}={value} is not a ComfyUI checkout (no main.py / nodes.py there)")
    return path


requires_comfyui = pytest.mark.skipif(os.environ.get(COMFYUI_ENV) is None, reason=SKIP_REASON)


def skip_without_comfyui() -> Path:
    """The checkout, or skip the calling module/test with the reason."""
    root = comfyui_dir()
    if root is None:
        pytest.skip(SKIP_REASON, allow_module_level=True)
    return root


# --------------------------------------------------------------------------------------------------------------
# In-process


def import_comfyui() -> Path:
    """Put the checkout first on ``sys.path`` and configure ComfyUI for the CPU before its modules load.

    The repository root holds the pack's ``nodes/`` package, and ``python -m pytest`` puts the current folder
    on ``sys.path``: ComfyUI's own ``nodes.py`` must come first, or ``import nodes`` would find ours.
    """
    root = skip_without_comfyui()
    if sys.path[0] != str(root):
        sys.path.insert(0, str(root))
    loaded = sys.modules.get("nodes")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() != root / "nodes.py":
        raise RuntimeError(f"a module named 'nodes' was imported from {loaded.__file__}; it shadows ComfyUI's nodes.py")
    import comfy.cli_args

    # Read by comfy.model_management at import: without it ComfyUI probes CUDA. Tests run on the CPU.
    comfy.cli_args.args.cpu = True
    import folder_paths

    # The pack writes its toy demo picture into the input folder when it loads: keep in-process tests from
    # writing into the ComfyUI checkout.
    if Path(folder_paths.get_input_directory()).resolve() == (root / "input").resolve():
        import tempfile

        folder_paths.set_input_directory(tempfile.mkdtemp(prefix="ip2p-comfy-input-"))
    return root


def picture(h=37, w=53, c=3, batch=1, seed=0):
    """A random ComfyUI IMAGE (batch, height, width, channels; values 0..1), the same for the same seed."""
    import torch

    return torch.rand(batch, h, w, c, generator=torch.Generator().manual_seed(seed))


def link_pack(custom_nodes: Path, name: str = PACK_FOLDER_NAME) -> Path:
    """The pack under ``custom_nodes/<name>``, as a user's clone would be (a symlink to this repository)."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    target = custom_nodes / name
    if not target.exists():
        target.symlink_to(REPO_ROOT, target_is_directory=True)
    return target


# --------------------------------------------------------------------------------------------------------------
# Live server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(AssertionError):
    """A request or a wait failed; the message carries the end of the server log."""


@dataclass
class ComfyServer:
    base_url: str
    base_dir: Path
    log_path: Path
    process: subprocess.Popen
    timeout: float = 120.0
    _logs_seen: int = field(default=0, repr=False)

    # -- plain HTTP ----------------------------------------------------------------------------------------
    def request(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                body = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, body.decode(errors="replace")

    def get_json(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise ServerError(f"GET {path} -> {status}: {body}\n{self.log_tail()}")
        return body

    def object_info(self, node_id: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{node_id}" if node_id else ""))

    def post_prompt(self, prompt: dict, client_id: str | None = None, extra_data: dict | None = None) -> str:
        """Queue an API-format prompt; returns its id. Validation errors raise with ComfyUI's node_errors.

        ``extra_data`` is sent as the frontend sends it, e.g. ``{"preview_method": "latent2rgb"}`` (the
        per-prompt preview setting).
        """
        payload: dict[str, Any] = {"prompt": prompt}
        if client_id:
            payload["client_id"] = client_id
        if extra_data:
            payload["extra_data"] = extra_data
        status, body = self.request("POST", "/prompt", payload)
        if status != 200:
            raise ServerError(f"POST /prompt -> {status}: {json.dumps(body, indent=1)[:3000]}")
        return body["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float | None = None) -> dict:
        """The history entry of a finished prompt (succeeded, failed or interrupted)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and (entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                return entry
            self.check_alive()
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish in time\n{self.log_tail()}")

    def run_prompt(self, prompt: dict, timeout: float | None = None) -> dict:
        """Queue, wait, and insist that it succeeded; returns the history entry."""
        entry = self.wait_history(self.post_prompt(prompt), timeout)
        if not entry["status"].get("completed"):
            raise ServerError(f"prompt failed: {json.dumps(entry['status'], indent=1)[:4000]}\n{self.log_tail()}")
        return entry

    def free(self, unload_models: bool = True, free_memory: bool = True, until_log: str | None = None,
             count: int = 1, timeout: float = 60.0) -> None:
        """What the UI's "Unload models" / "Free model and node cache" buttons send.

        With ``until_log`` (a regex), wait until the log shows it ``count`` times. ComfyUI's worker reads the
        flags only when woken, and a wake-up sent while it is still tidying up after a prompt (gc) is lost
        until the next prompt; so the request is repeated every few seconds until the effect shows. Repeating
        is harmless: the flags are just set again.
        """
        mark = self.log_mark()
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})
            if status != 200:
                raise ServerError(f"POST /free -> {status}: {body}")
            if until_log is None:
                return
            try:
                self.wait_for_log(until_log, since=mark, count=count, timeout=min(3.0, deadline - time.monotonic()))
                return
            except ServerError:
                if time.monotonic() >= deadline:
                    raise

    def interrupt(self, prompt_id: str | None = None) -> None:
        status, body = self.request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        if status != 200:
            raise ServerError(f"POST /interrupt -> {status}: {body}")

    # -- files ---------------------------------------------------------------------------------------------
    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def output_files(self, entry: dict, node_id: str, kind: str = "images") -> list[Path]:
        """Files a node (e.g. SaveImage) wrote, from a history entry."""
        items = entry["outputs"].get(node_id, {}).get(kind, [])
        return [self.output_dir / item.get("subfolder", "") / item["filename"] for item in items]

    # -- log -----------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 6000) -> str:
        return "---- server log (end) ----\n" + self.log_text()[-chars:]

    def log_mark(self) -> int:
        """A position in the log; pass it to :meth:`log_since` / :meth:`wait_for_log` to look only after it."""
        return len(self.log_text())

    def log_since(self, mark: int) -> str:
        return self.log_text()[mark:]

    def wait_for_log(self, pattern: str, since: int = 0, count: int = 1, timeout: float = 30.0) -> list[str]:
        """Wait until ``pattern`` (a regex) matched ``count`` times in the log after ``since``."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.findall(pattern, self.log_since(since))
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise ServerError(f"log never showed {pattern!r} x{count} (saw {len(found)})\n{self.log_tail()}")
            self.check_alive()
            time.sleep(0.2)

    # -- process -------------------------------------------------------------------------------------------
    def memory_status(self) -> dict[str, int]:
        """The server process's ``/proc/<pid>/status`` memory lines (``VmRSS``, ``VmHWM``, ``RssAnon`` ...) in bytes."""
        self.check_alive()
        out = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            parts = value.split()
            if name.startswith(("Vm", "Rss")) and len(parts) == 2 and parts[1] == "kB":
                out[name] = int(parts[0]) * 1024
        return out

    def rss(self) -> int:
        """Resident memory of the server process now (VmRSS), in bytes."""
        return self.memory_status()["VmRSS"]

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ServerError(f"ComfyUI exited with code {self.process.returncode}\n{self.log_tail()}")

    def events(self) -> "EventStream":
        """A websocket listener for this server (progress, executing, execution_* messages)."""
        return EventStream(self.base_url)


def _write_extra_paths(path: Path, model_paths: dict[str, list[Path]]) -> Path:
    # One yaml section; several folders for one key go on separate lines, as ComfyUI's loader splits them.
    lines = ["ip2p_tests:"]
    for key, folders in model_paths.items():
        lines.append(f"    {key}: |")
        lines.extend(f"        {Path(f).resolve()}" for f in folders)
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def comfy_server(
    base_dir: Path,
    extra_model_paths: dict[str, list[Path]] | None = None,
    extra_args: tuple[str, ...] = (),
    pack_folder_name: str = PACK_FOLDER_NAME,
    startup_timeout: float = 120.0,
) -> Iterator[ComfyServer]:
    """A ComfyUI server on a free loopback port, with this pack, in ``base_dir``; killed on exit, always.

    ``base_dir`` becomes ComfyUI's base directory (models/, custom_nodes/, input/, output/, user/, temp/), so
    nothing is written into the checkout. ``extra_model_paths`` maps a model folder key (``instructpix2pix``,
    ``checkpoints``, ``diffusers`` ...) to folders added through ``--extra-model-paths-config``.
    """
    root = skip_without_comfyui()
    base_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("models", "input", "output", "user", "temp"):
        (base_dir / sub).mkdir(exist_ok=True)
    link_pack(base_dir / "custom_nodes", pack_folder_name)
    yaml_path = _write_extra_paths(base_dir / "extra_model_paths.yaml", extra_model_paths or {})
    port = free_port()
    log_path = base_dir / "server.log"
    cmd = [
        sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(base_dir), "--extra-model-paths-config", str(yaml_path),
        "--database-url", "sqlite:///:memory:", "--disable-auto-launch", "--disable-api-nodes",
        *extra_args,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("COMFYUI_DIR", None)  # the server must find the tokenizer as a user's ComfyUI would, not via tests
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, cwd=root, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(f"http://127.0.0.1:{port}", base_dir, log_path, process)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            server.check_alive()
            try:
                with urllib.request.urlopen(server.base_url + "/object_info", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"ComfyUI did not answer /object_info in {startup_timeout:.0f}s\n{server.log_tail()}")
            time.sleep(0.3)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


# --------------------------------------------------------------------------------------------------------------
# Websocket events


# Binary websocket messages: a big-endian uint32 event type (ComfyUI's protocol.BinaryEventTypes), then the
# payload; a preview's payload is a uint32 image type (1 JPEG, 2 PNG) and the encoded picture.
PREVIEW_IMAGE = 1
PREVIEW_IMAGE_TYPES = {1: "JPEG", 2: "PNG"}


@dataclass(frozen=True)
class BinaryMessage:
    event: int  # protocol.BinaryEventTypes: 1 PREVIEW_IMAGE (what a client without preview metadata gets)
    payload: bytes

    def preview(self) -> tuple[str, bytes]:
        """(format, encoded picture) of a PREVIEW_IMAGE message, as the frontend reads it."""
        if self.event != PREVIEW_IMAGE:
            raise ValueError(f"binary event {self.event} is not a preview image")
        kind = int.from_bytes(self.payload[:4], "big")
        return PREVIEW_IMAGE_TYPES.get(kind, f"type {kind}"), self.payload[4:]


class EventStream:
    """Collects the messages ComfyUI sends to one client id over ``/ws``, on a background thread.

    Queue prompts with ``client_id=stream.client_id`` to receive their ``progress`` / ``executing`` /
    ``execution_*`` JSON messages in :attr:`messages`, and the binary ones (live previews) in :attr:`binary`,
    each in arrival order; :attr:`timeline` holds both, interleaved as they came. Uses aiohttp, which ComfyUI
    itself requires.
    """

    def __init__(self, base_url: str, connect_timeout: float = 15.0):
        self.client_id = uuid.uuid4().hex
        self.messages: list[dict] = []
        self.binary: list[BinaryMessage] = []
        self.timeline: list[dict | BinaryMessage] = []
        self._url = base_url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, name="comfy-ws", daemon=True)
        self._thread.start()
        if not self._connected.wait(connect_timeout):
            self.close()
            raise ServerError(f"could not connect to {self._url}: {self._error}")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self._listen())
        try:
            self._loop.run_until_complete(self._task)
        except (asyncio.CancelledError, Exception) as exc:  # closed by us, or the server went away
            self._error = exc
        finally:
            self._loop.close()

    async def _listen(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self._url) as ws:
                self._connected.set()
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        item: dict | BinaryMessage = json.loads(msg.data)
                        target = self.messages
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        item = BinaryMessage(int.from_bytes(msg.data[:4], "big"), bytes(msg.data[4:]))
                        target = self.binary
                    else:
                        continue
                    with self._cond:
                        target.append(item)
                        self.timeline.append(item)
                        self._cond.notify_all()

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        """The first message (so far or to come) for which ``predicate`` is true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    types = sorted({m.get("type", "?") for m in self.messages})
                    raise ServerError(f"no matching websocket message within {timeout}s (saw types {types})")
                self._cond.wait(remaining)

    def previews(self) -> list[tuple[str, bytes]]:
        """The live preview pictures received so far, as (format, encoded picture)."""
        with self._cond:
            return [m.preview() for m in self.binary if m.event == PREVIEW_IMAGE]

    def of_type(self, kind: str, prompt_id: str | None = None) -> list[dict]:
        with self._cond:
            return [
                m["data"] for m in self.messages
                if m.get("type") == kind and (prompt_id is None or m.get("data", {}).get("prompt_id") == prompt_id)
            ]

    def close(self) -> None:
        if self._task is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout=10)

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def copy_into(src: Path, folder: Path, name: str | None = None) -> Path:
    """Copy a model file or folder into a model folder (tests own their copies, so they may delete them)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / (name or src.name)
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dest)
    return dest
