"""Drive a real ComfyUI server over HTTP: start it as a subprocess with its own base directory (models,
input, output, custom_nodes, user), wait for it, check that this pack's nodes registered, queue an
API-format workflow, wait for it to finish and return the images it wrote. Standard library only, so any
Python can run the client; the server itself runs under the host's venv Python.

Library:
    with ComfyServer(comfyui_dir, base_dir, python=venv_python) as server:   # starts, and stops on exit
        server.check_nodes(["IDFusionApply", ...])
        images = server.run(prompt_dict, timeout=300)                       # absolute paths

    client = ComfyClient("http://127.0.0.1:8188")       # a server started elsewhere: the same API, files over HTTP
    name = client.upload_image("face.png")                # into its input folder, for a LoadImage node
    entry = client.wait(client.queue(prompt_dict))        # the history entry
    png = client.view(entry["outputs"][node_id]["images"][0])   # an output image's bytes

CLI:
    python scripts/comfy_server.py run workflows/api/idfusion_basic_api.json --base DIR [--comfyui DIR] [--python PY]
    python scripts/comfy_server.py serve --base DIR [--port 8188]           # keep it running until Ctrl-C

The server is started as
    <python> main.py --cpu --listen 127.0.0.1 --port <free port> --base-directory <base> ...
(--base-directory exists in both pinned hosts, 0.3.52 and 0.3.75). Its stdout/stderr go to
<base>/comfyui_server.log.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "ComfyUI-IDFusion"
LOG_NAME = "comfyui_server.log"


class ComfyServerError(RuntimeError):
    """The server did not start, rejected the prompt, or the prompt failed while executing."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_comfyui_dir() -> str:
    return os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".hosts", "0.3.75", "ComfyUI")


def default_python(comfyui_dir: str) -> str:
    """The venv next to a host made by scripts/setup_host.sh (.hosts/<v>/venv), else this Python."""
    venv_python = os.path.join(os.path.dirname(os.path.abspath(comfyui_dir)), "venv", "bin", "python")
    return venv_python if os.path.isfile(venv_python) else sys.executable


def link_pack(base_dir: str, pack_dir: str = ROOT) -> str:
    """<base>/custom_nodes/ComfyUI-IDFusion -> the pack (the checkout), as a user would install it."""
    custom_nodes = os.path.join(base_dir, "custom_nodes")
    os.makedirs(custom_nodes, exist_ok=True)
    link = os.path.join(custom_nodes, PACK_NAME)
    target = os.path.abspath(pack_dir)
    if os.path.islink(link):
        if os.path.realpath(link) == os.path.realpath(target):
            return link
        os.unlink(link)
    elif os.path.exists(link):
        raise ComfyServerError(f"{link} exists and is not a link to the pack; remove it or use another base directory.")
    os.symlink(target, link, target_is_directory=True)
    return link


def format_node_errors(node_errors: dict) -> str:
    lines = []
    for node_id, info in (node_errors or {}).items():
        for err in info.get("errors", []):
            detail = f" ({err['details']})" if err.get("details") else ""
            lines.append(f"  node {node_id} ({info.get('class_type', '?')}): {err.get('message', '')}{detail}")
    return "\n".join(lines)


class ComfyClient:
    """The HTTP API of a running ComfyUI server: queue prompts, wait for them, upload inputs, fetch outputs."""

    def __init__(self, url: str | None = None):
        self._url = (url or "").rstrip("/")
        # the only network traffic is to the ComfyUI server the user names: never file:// or other schemes
        if self._url and urllib.parse.urlsplit(self._url).scheme not in ("http", "https"):
            raise ComfyServerError(f"ComfyUI server URL '{url}' must start with http:// or https://, e.g. http://127.0.0.1:8188.")
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return self._url

    # a server someone else started has no process or log here; ComfyServer overrides these three
    def _check_alive(self, when: str):
        pass

    def _log_hint(self) -> str:
        return "See the ComfyUI server's console for details."

    def _node_load_hint(self) -> str:
        return "Check the server's console for 'IMPORT FAILED' lines of the custom node pack that provides them."

    # ---- HTTP --------------------------------------------------------------------------------------
    def _http(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
              timeout: float = 30.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type} if content_type else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def _request(self, method: str, path: str, data=None, timeout: float = 30.0):
        body = json.dumps(data).encode() if data is not None else None
        return json.loads(self._http(method, path, body, "application/json" if body else None, timeout).decode() or "null")

    def get_json(self, path: str, timeout: float = 30.0):
        return self._request("GET", path, timeout=timeout)

    def post_json(self, path: str, data, timeout: float = 30.0):
        return self._request("POST", path, data, timeout=timeout)

    # ---- API ---------------------------------------------------------------------------------------
    def object_info(self) -> dict:
        return self.get_json("/object_info", timeout=120)

    def check_nodes(self, names) -> dict:
        """Raise unless every node class in `names` is registered; returns /object_info."""
        info = self.object_info()
        missing = sorted(set(names) - set(info))
        if missing:
            raise ComfyServerError(f"Nodes not registered by the server: {', '.join(missing)}.\n{self._node_load_hint()}")
        return info

    def upload_image(self, path: str) -> str:
        """POST /upload/image (multipart, what the UI's upload button sends) into the server's input folder; returns
        the name for a LoadImage node. A different file of the same name is kept: the server picks a new name."""
        boundary = uuid.uuid4().hex
        name = os.path.basename(path).replace('"', "_")
        with open(path, "rb") as f:
            data = f.read()
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        try:
            info = json.loads(self._http("POST", "/upload/image", body, f"multipart/form-data; boundary={boundary}", 120))
        except urllib.error.HTTPError as e:
            raise ComfyServerError(f"Uploading {path} failed with HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def view(self, image: dict, timeout: float = 120.0) -> bytes:
        """The bytes of an image listed in a history entry ({filename, subfolder, type}), from GET /view."""
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder") or "",
                                        "type": image.get("type") or "output"})
        return self._http("GET", "/view?" + query, timeout=timeout)

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id. Validation errors raise with the server's message."""
        try:
            r = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                err = json.loads(text)
            except ValueError:
                raise ComfyServerError(f"POST /prompt failed with HTTP {e.code}: {text[:2000]}") from None
            e_ = err.get("error") or {}
            msg = e_.get("message", str(e_)) if isinstance(e_, dict) else str(e_)
            details = e_.get("details", "") if isinstance(e_, dict) else ""
            raise ComfyServerError(f"The server rejected the prompt: {msg}" + (f" ({details})" if details else "")
                                   + ("\n" + format_node_errors(err.get("node_errors")) if err.get("node_errors") else "")) from None
        if r.get("node_errors"):
            raise ComfyServerError("The server reported node errors:\n" + format_node_errors(r["node_errors"]))
        return r["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.5) -> dict:
        """Poll /history/<id> until the prompt finished; returns its history entry, raises on failure."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(f"while running prompt {prompt_id}")
            try:
                entry = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
            except (urllib.error.URLError, socket.timeout, ConnectionError) as e:  # busy server: ask again
                if isinstance(e, urllib.error.HTTPError):
                    raise ComfyServerError(f"GET /history/{prompt_id} failed with HTTP {e.code}") from None
                if isinstance(getattr(e, "reason", e), ConnectionRefusedError):  # nothing listens: it is gone, not busy
                    self._check_alive(f"while running prompt {prompt_id}")
                    raise ComfyServerError(f"ComfyUI at {self.url} stopped answering while running prompt {prompt_id}.\n"
                                           f"{self._log_hint()}") from None
                entry = None
            if entry is not None:
                # the history entry is only written once the prompt is done, successfully or not
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or status.get("completed") is False:
                    raise ComfyServerError(self._execution_error(prompt_id, status))
                return entry
            if time.monotonic() > deadline:
                raise ComfyServerError(f"Prompt {prompt_id} did not finish within {timeout:.0f}s.\n{self._log_hint()}")
            time.sleep(poll)

    def _execution_error(self, prompt_id: str, status: dict) -> str:
        for event, data in status.get("messages", []):
            if event == "execution_error":
                tb = "".join(data.get("traceback") or [])
                return (f"Prompt {prompt_id} failed in node {data.get('node_id')} ({data.get('node_type')}): "
                        f"{data.get('exception_type')}: {data.get('exception_message', '').strip()}\n"
                        f"Server traceback:\n{tb}")
            if event == "execution_interrupted":
                return f"Prompt {prompt_id} was interrupted at node {data.get('node_id')} ({data.get('node_type')})."
        return f"Prompt {prompt_id} failed (status {status.get('status_str')!r}).\n{self._log_hint()}"


class ComfyServer(ComfyClient):
    """A ComfyUI server this process starts (and stops), in a base directory of its own."""

    def __init__(self, comfyui_dir: str | None = None, base_dir: str = "", python: str | None = None,
                 port: int | None = None, host: str = "127.0.0.1", pack_dir: str | None = ROOT,
                 extra_args: list[str] | tuple = (), env: dict | None = None):
        if not base_dir:
            raise ValueError("base_dir is required (models, input, output and custom_nodes live under it)")
        self.comfyui_dir = os.path.abspath(comfyui_dir or default_comfyui_dir())
        if not os.path.isfile(os.path.join(self.comfyui_dir, "main.py")):
            raise ComfyServerError(f"No ComfyUI main.py in {self.comfyui_dir} (run `make setup` or set COMFYUI_PATH).")
        self.base_dir = os.path.abspath(base_dir)
        self.python = python or default_python(self.comfyui_dir)
        self.host = host
        self.port = port
        self.pack_dir = pack_dir
        self.extra_args = list(extra_args)
        self.env = env
        self.log_path = os.path.join(self.base_dir, LOG_NAME)
        self.proc: subprocess.Popen | None = None
        self._log = None
        super().__init__()

    # ---- paths -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def dir(self, kind: str) -> str:
        """input, output, temp, models, custom_nodes, user under the base directory."""
        return os.path.join(self.base_dir, kind)

    # ---- process -----------------------------------------------------------------------------------
    def command(self) -> list[str]:
        db = os.path.join(self.base_dir, "user", "comfyui.db")
        return [self.python, "main.py", "--cpu", "--listen", self.host, "--port", str(self.port),
                "--base-directory", self.base_dir, "--database-url", f"sqlite:///{db}",
                "--disable-auto-launch", "--disable-api-nodes", *self.extra_args]

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        """launch() and wait_ready(); stops the server again if it does not come up."""
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> "ComfyServer":
        """Start the process without waiting for it (call wait_ready() later, e.g. after preparing models)."""
        if self.proc is not None:
            raise ComfyServerError("server already started")
        for d in ("input", "output", "temp", "user", "custom_nodes", os.path.join("models", "checkpoints")):
            os.makedirs(self.dir(d), exist_ok=True)
        if self.pack_dir:
            link_pack(self.base_dir, self.pack_dir)
        if self.port is None:
            self.port = free_port(self.host)
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        self._log = open(self.log_path, "w", buffering=1)
        self._log.write(f"$ (cd {self.comfyui_dir} && {' '.join(self.command())})\n")
        self.proc = subprocess.Popen(self.command(), cwd=self.comfyui_dir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 180.0):
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("while starting")
            try:
                self.get_json("/system_stats", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            if time.monotonic() > deadline:
                raise ComfyServerError(f"ComfyUI did not answer {self.url}/system_stats within {timeout:.0f}s.\n"
                                       f"Last lines of {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def _check_alive(self, when: str):
        if self.proc is not None and self.proc.poll() is not None:
            raise ComfyServerError(f"ComfyUI exited with code {self.proc.returncode} {when}.\n"
                                   f"Last lines of {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 15.0):
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(grace)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()
        return False

    def _log_hint(self) -> str:
        return f"Last lines of {self.log_path}:\n{self.log_tail()}"

    def _node_load_hint(self) -> str:
        hints = [l for l in self.log_tail(400).splitlines()
                 if "IDFusion" in l or "import failed" in l.lower() or "cannot import" in l.lower()]
        return f"Custom-node lines from {self.log_path}:\n" + "\n".join(hints[-30:])

    # ---- outputs -----------------------------------------------------------------------------------
    def output_images(self, entry: dict) -> list[str]:
        """Absolute paths of the images a finished prompt wrote (SaveImage: output/<subfolder>/<filename>)."""
        paths = []
        for node_id in sorted(entry.get("outputs", {}), key=lambda k: (len(k), k)):
            for img in entry["outputs"][node_id].get("images", []) or []:
                folder = self.dir(img.get("type") or "output")
                paths.append(os.path.join(folder, img.get("subfolder") or "", img["filename"]))
        return paths

    def run(self, prompt: dict, timeout: float = 300.0) -> list[str]:
        """Queue, wait, and return the absolute paths of the output images."""
        return self.output_images(self.wait(self.queue(prompt), timeout=timeout))


def load_workflow(path: str) -> dict:
    with open(path) as f:
        prompt = json.load(f)
    if not isinstance(prompt, dict) or not all(isinstance(v, dict) and "class_type" in v for v in prompt.values()):
        raise ComfyServerError(f"{path} is not an API-format workflow (export it with 'Save (API)').")
    return prompt


def pack_node_names(pack_dir: str = ROOT) -> list[str]:
    """The pack's node class names, read from its sources without importing ComfyUI here."""
    import ast
    names = []
    for fn in sorted(os.listdir(os.path.join(pack_dir, "nodes"))):
        if not fn.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(pack_dir, "nodes", fn)).read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NODE_CLASS_MAPPINGS" for t in node.targets) \
                    and isinstance(node.value, ast.Dict):
                names += [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description="Run ComfyUI as a server and drive it over HTTP.")
    p.add_argument("--comfyui", default=None, help="ComfyUI directory (default: $COMFYUI_PATH or .hosts/0.3.75/ComfyUI)")
    p.add_argument("--python", default=None, help="Python for the server (default: the host's venv, else this one)")
    p.add_argument("--base", required=True, help="base directory: models/, input/, output/, custom_nodes/ live here")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--start-timeout", type=float, default=180.0)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="queue an API-format workflow and print the output image paths")
    r.add_argument("workflow")
    r.add_argument("--timeout", type=float, default=600.0)
    sub.add_parser("serve", help="start the server and keep it running until Ctrl-C")
    a = p.parse_args(argv)

    server = ComfyServer(a.comfyui, a.base, python=a.python, port=a.port)
    try:
        with server.start(a.start_timeout):
            print(f"ComfyUI at {server.url} (log: {server.log_path})", flush=True)
            server.check_nodes(pack_node_names())
            if a.cmd == "serve":
                try:
                    while True:
                        server._check_alive("")
                        time.sleep(1)
                except KeyboardInterrupt:
                    return 0
            for path in server.run(load_workflow(a.workflow), timeout=a.timeout):
                print(path)
    except ComfyServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
