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
    events = client.events()                              # the server's websocket: ("progress", {...}), ...
    client.queue_state(); client.cancel([prompt_id]); client.interrupt(prompt_id)   # queue management

scripts/batch.py spreads many jobs over several servers with this client; scripts/face_benchmark.py runs on it.

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
import base64
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "ComfyUI-IDFusion"
LOG_NAME = "comfyui_server.log"
# What the client reads from a server, at most: a server that claims or streams more is refused, not followed into an
# unbounded allocation. Far above what ComfyUI sends (/object_info of a large install is tens of MB, a websocket
# event a few KB, a preview JPEG well under 1 MB); a caller may change them on its client (ComfyClient.max_*).
MAX_ANSWER_BYTES = 256 << 20   # one JSON answer (/object_info, /history, /queue, /prompt, ...)
MAX_VIEW_BYTES = 1 << 30       # one output file through GET /view
MAX_EVENT_BYTES = 64 << 20     # one websocket message, all its fragments together
MAX_HANDSHAKE_BYTES = 64 << 10 # the websocket handshake's response headers
_CHUNK = 1 << 20


class ComfyServerError(RuntimeError):
    """The server did not start, rejected the prompt, or the prompt failed while executing."""


class AnswerTooLarge(ComfyServerError):
    """A server's answer is larger than the client's limit for it; nothing past the limit was read."""


def _mb(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def read_capped(response, limit: int, what: str, where: str, seconds: float | None = None) -> bytes:
    """The body of an HTTP response (or HTTPError), at most `limit` bytes: refused before reading when Content-Length
    says more, and after limit + 1 bytes when the server streams without one (or sends more than it said). With
    `seconds`, the whole body must arrive within that time: the socket timeout bounds each read, not a server that
    sends a byte just inside it forever (a TimeoutError, which callers already treat as a timed-out request)."""
    deadline = None if seconds is None else time.monotonic() + seconds
    hint = "a ComfyUI server does not send that much; check the URL (ComfyClient.max_* raise the limits)"
    declared = response.headers.get("Content-Length") if getattr(response, "headers", None) is not None else None
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise AnswerTooLarge(f"{where} answered {what} with {int(declared)} bytes, more than this client's limit of "
                             f"{_mb(limit)}; not read ({hint}).")
    read = getattr(response, "read1", None) or response.read   # read1: what one socket read brings, so the clock is seen
    parts, size = [], 0
    while size <= limit:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{where} sent {what} too slowly: {size} bytes in {seconds:.0f}s, the request's time "
                               f"limit; stopped reading.")
        chunk = read(min(_CHUNK, limit + 1 - size))
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        size += len(chunk)
    raise AnswerTooLarge(f"{where} answered {what} with more than this client's limit of {_mb(limit)}; stopped reading "
                         f"there ({hint}).")


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
        # the most this client reads of one answer, one output file, one websocket message (module constants above)
        self.max_answer_bytes, self.max_view_bytes, self.max_event_bytes = MAX_ANSWER_BYTES, MAX_VIEW_BYTES, MAX_EVENT_BYTES

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
              timeout: float = 30.0, limit: int | None = None) -> bytes:
        """The answer's body, at most `limit` bytes (default: max_answer_bytes); AnswerTooLarge past it."""
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type} if content_type else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return read_capped(r, self.max_answer_bytes if limit is None else limit, f"{method} {path[:200]}", self.url,
                               seconds=timeout)

    def _error_text(self, e: urllib.error.HTTPError, limit: int = 1 << 20) -> str:
        """An error answer's body, for the message; a huge one is cut, never read whole."""
        try:
            return read_capped(e, limit, f"HTTP {e.code}", self.url).decode(errors="replace")
        except AnswerTooLarge as too_large:
            return str(too_large)

    def _request(self, method: str, path: str, data=None, timeout: float = 30.0):
        body = json.dumps(data).encode() if data is not None else None
        text = self._http(method, path, body, "application/json" if body else None, timeout).decode() or "null"
        try:
            return json.loads(text)
        except RecursionError:  # '[[[[...' nested 100000 deep: as unreadable as any other answer that is not JSON
            raise ValueError(f"{self.url} answered {method} {path[:200]} with JSON nested too deep to read") from None

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

    def upload_image(self, path: str, name: str | None = None) -> str:
        """POST /upload/image (multipart, what the UI's upload button sends) into the server's input folder; returns
        the name for a LoadImage node. A different file of the same name is kept: the server picks a new name.
        `name`: the file name on the server (default: the file's own)."""
        boundary = uuid.uuid4().hex
        name = (name or os.path.basename(path)).replace('"', "_")
        with open(path, "rb") as f:
            data = f.read()
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        try:
            info = json.loads(self._http("POST", "/upload/image", body, f"multipart/form-data; boundary={boundary}", 120))
        except urllib.error.HTTPError as e:
            raise ComfyServerError(f"Uploading {path} failed with HTTP {e.code}: {self._error_text(e)[:500]}") from None
        # a server's answer of another shape is this upload's error, not a KeyError in the caller
        if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not info["name"] \
                or not isinstance(info.get("subfolder") or "", str):
            raise ComfyServerError(f"{self.url} answered the upload of {path} without a file name: {str(info)[:200]}")
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def view(self, image: dict, timeout: float = 120.0, max_bytes: int | None = None) -> bytes:
        """The bytes of an image listed in a history entry ({filename, subfolder, type}), from GET /view; at most
        `max_bytes` (default: max_view_bytes), AnswerTooLarge past it."""
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder") or "",
                                        "type": image.get("type") or "output"})
        return self._http("GET", "/view?" + query, timeout=timeout,
                          limit=self.max_view_bytes if max_bytes is None else max_bytes)

    def queue(self, prompt: dict, prompt_id: str | None = None) -> str:
        """POST /prompt; returns the prompt id. Validation errors raise with the server's message. `prompt_id`: choose
        the id (both pinned hosts accept it), so a request that timed out can still be looked up."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if prompt_id:
            body["prompt_id"] = prompt_id
        try:
            r = self.post_json("/prompt", body)
        except urllib.error.HTTPError as e:
            text = self._error_text(e)
            try:
                err = json.loads(text)
            except ValueError:
                raise ComfyServerError(f"POST /prompt failed with HTTP {e.code}: {text[:2000]}") from None
            e_ = err.get("error") or {}
            msg = e_.get("message", str(e_)) if isinstance(e_, dict) else str(e_)
            details = e_.get("details", "") if isinstance(e_, dict) else ""
            raise ComfyServerError(f"The server rejected the prompt: {msg}" + (f" ({details})" if details else "")
                                   + ("\n" + format_node_errors(err.get("node_errors")) if err.get("node_errors") else "")) from None
        if isinstance(r, dict) and r.get("node_errors"):
            raise ComfyServerError("The server reported node errors:\n" + format_node_errors(r["node_errors"]))
        if not isinstance(r, dict) or not isinstance(r.get("prompt_id"), str):
            raise ComfyServerError(f"{self.url} answered POST /prompt without a prompt_id: {str(r)[:200]}")
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
                return self.check_entry(prompt_id, entry)
            if time.monotonic() > deadline:
                raise ComfyServerError(f"Prompt {prompt_id} did not finish within {timeout:.0f}s.\n{self._log_hint()}")
            time.sleep(poll)

    def check_entry(self, prompt_id: str, entry: dict) -> dict:
        """A history entry (only written once the prompt is done, successfully or not); raises if it failed."""
        status = entry.get("status") or {}
        if status.get("status_str") == "error" or status.get("completed") is False:
            raise ComfyServerError(self._execution_error(prompt_id, status))
        return entry

    def history(self, prompt_id: str, timeout: float = 30.0) -> dict | None:
        """GET /history/<id>: the entry of a finished prompt, None while it is queued or running (or unknown)."""
        return (self.get_json(f"/history/{urllib.parse.quote(prompt_id)}", timeout=timeout) or {}).get(prompt_id)

    def queue_state(self, timeout: float = 30.0) -> tuple[list[str], list[str]]:
        """GET /queue: (running prompt ids, pending prompt ids), of every client."""
        q = self.get_json("/queue", timeout=timeout) or {}
        ids = lambda items: [item[1] for item in items or [] if len(item) > 1]  # (number, prompt_id, prompt, ...)
        return ids(q.get("queue_running")), ids(q.get("queue_pending"))

    def cancel(self, prompt_ids, timeout: float = 30.0):
        """Remove prompts from the server's pending queue (POST /queue delete); a running or finished one stays."""
        if prompt_ids:
            self._request("POST", "/queue", {"delete": list(prompt_ids)}, timeout=timeout)

    def interrupt(self, prompt_id: str, timeout: float = 30.0) -> bool:
        """Interrupt `prompt_id` if it is the one running. 0.3.75 checks the id itself; 0.3.52's /interrupt stops
        whatever runs, so the id is checked here first (a prompt of another client that starts in between, within
        milliseconds, could still be hit there)."""
        running, _ = self.queue_state(timeout)
        if prompt_id not in running:
            return False
        self._request("POST", "/interrupt", {"prompt_id": prompt_id}, timeout=timeout)
        return True

    def events(self, timeout: float = 10.0) -> "EventStream":
        """The server's websocket (/ws) for this client id: status, execution_start, executing, progress,
        executed, execution_success / execution_error / execution_interrupted of the prompts it queued."""
        return EventStream(self.url, self.client_id, timeout, max_message=self.max_event_bytes)

    @staticmethod
    def output_files(entry: dict, types=("output",)) -> list[tuple[str, dict]]:
        """[(node id, {filename, subfolder, type}), ...] of every file a finished prompt lists in its outputs
        (images, gifs, audio, ...), in node order; only those of `types` (SaveImage: output, PreviewImage: temp)."""
        files = []
        for node_id in sorted(entry.get("outputs") or {}, key=lambda k: (len(k), k)):
            for value in (entry["outputs"][node_id] or {}).values():
                if isinstance(value, list):
                    files += [(node_id, f) for f in value if isinstance(f, dict) and "filename" in f
                              and (f.get("type") or "output") in types]
        return files

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


class EventStream:
    """A minimal websocket client (RFC 6455, standard library) for ComfyUI's /ws?clientId=...: text frames are the
    server's JSON events, binary ones (previews) are skipped; pings are answered. recv() returns (type, data), None
    when nothing came within the timeout, and raises ConnectionError once the server closed or vanished, or sent a
    message larger than `max_message` bytes (the socket is closed then: the rest of that message is never read)."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, client_id: str, timeout: float = 10.0, max_message: int = MAX_EVENT_BYTES):
        self.url, self.max_message = url, max_message
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme == "https"
        host, port = parts.hostname or "127.0.0.1", parts.port or (443 if secure else 80)
        sock = socket.create_connection((host, port), timeout=timeout)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        self._sock, self._buf, self._frags, self._closed = sock, b"", [], False
        key = base64.b64encode(os.urandom(16)).decode()
        path = (parts.path.rstrip("/") or "") + "/ws?clientId=" + urllib.parse.quote(client_id)
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in self._buf:
            if len(self._buf) > MAX_HANDSHAKE_BYTES:
                sock.close()
                raise ConnectionError(f"{url}/ws sent more than {MAX_HANDSHAKE_BYTES} bytes of handshake headers; "
                                      f"not a ComfyUI websocket")
            chunk = sock.recv(4096)
            if not chunk:
                sock.close()
                raise ConnectionError(f"{url}/ws closed during the websocket handshake")
            self._buf += chunk
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept:
            sock.close()
            raise ConnectionError(f"{url}/ws did not accept the websocket: {lines[0]}")

    def _frame(self):
        """(opcode, fin, payload) of the next complete frame in the buffer, or None; consumes it."""
        b = self._buf
        if len(b) < 2:
            return None
        n, i = b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, i = int.from_bytes(b[2:4], "big"), 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, i = int.from_bytes(b[2:10], "big"), 10
        held = sum(len(p) for _, p in self._frags) if b[0] & 0x0F in (0, 1, 2) else 0
        if n + held > self.max_message:  # refused on its header: the payload is never buffered
            self._fail(f"{self.url}/ws sent a message of {n + held} bytes{' (with its earlier fragments)' if held else ''}"
                       f", more than this client's limit of {_mb(self.max_message)} (EventStream max_message); "
                       f"a ComfyUI server's events are a few KB")
        mask = None
        if b[1] & 0x80:  # servers do not mask, but the format allows it
            if len(b) < i + 4:
                return None
            mask, i = b[i:i + 4], i + 4
        if len(b) < i + n:
            return None
        payload, self._buf = b[i:i + n], b[i + n:]
        if mask:
            payload = bytes(c ^ mask[k % 4] for k, c in enumerate(payload))
        return b[0] & 0x0F, bool(b[0] & 0x80), payload

    def _fail(self, message: str):
        """Close the socket and raise: the rest of the stream cannot be framed any more."""
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass
        raise ConnectionError(message)

    def _send(self, opcode: int, payload: bytes = b""):
        mask = os.urandom(4)  # a client must mask every frame it sends
        n = len(payload)
        size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 65536 \
            else bytes([0x80 | 127]) + n.to_bytes(8, "big")
        head = bytes([0x80 | opcode]) + size
        self._sock.sendall(head + mask + bytes(c ^ mask[k % 4] for k, c in enumerate(payload)))

    def recv(self, timeout: float = 1.0):
        deadline = time.monotonic() + timeout
        while True:
            if self._closed:
                raise ConnectionError("websocket closed")
            frame = self._frame()
            if frame is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._sock.settimeout(left)
                try:
                    chunk = self._sock.recv(65536)
                except (socket.timeout, TimeoutError):
                    return None
                except OSError as e:
                    self._closed = True
                    raise ConnectionError(f"websocket lost: {e}") from None
                if not chunk:
                    self._closed = True
                    raise ConnectionError("websocket closed by the server")
                self._buf += chunk
                continue
            opcode, fin, payload = frame
            if opcode == 8:  # close
                self._closed = True
                raise ConnectionError("websocket closed by the server")
            if opcode == 9:  # ping
                self._send(10, payload)
                continue
            if opcode in (0, 1, 2):
                self._frags.append((opcode, payload))
                if not fin:
                    continue
                first, data = self._frags[0][0], b"".join(p for _, p in self._frags)
                self._frags = []
                if first == 1:  # text: {"type": ..., "data": ...}
                    try:
                        msg = json.loads(data.decode("utf-8"))
                    except (ValueError, RecursionError):  # not JSON, or nested too deep: not an event
                        continue
                    if isinstance(msg, dict) and "type" in msg:
                        return msg["type"], msg.get("data") or {}

    def close(self):
        if not self._closed:
            self._closed = True
            try:
                self._send(8)
            except OSError:
                pass
        try:
            self._sock.close()
        except OSError:
            pass


def write_atomic(path: str, data):
    """Temp file in the same folder, then os.replace: readers never see a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
        """Absolute paths of the images a finished prompt wrote (SaveImage: output/<subfolder>/<filename>); the
        previews nodes show in the UI (type "temp": reference thumbnails, region overlays) are not results."""
        paths = []
        for node_id in sorted(entry.get("outputs", {}), key=lambda k: (len(k), k)):
            for img in entry["outputs"][node_id].get("images", []) or []:
                if (img.get("type") or "output") != "output":
                    continue
                folder = self.dir("output")
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
