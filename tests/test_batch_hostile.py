"""scripts/batch.py against a HOSTILE server: a small HTTP server on 127.0.0.1, started here, that speaks ComfyUI's API
but answers with node ids like ../../X or absolute paths, upload answers without a name, history entries of the wrong
shape, a /prompt answer without prompt_id. The runner (batch.main, Runner, Worker, the one HTTP client comfy_server)
is the real one; only the server around it is made up. Issue 18: the runner writes only under --out, a job's bad
value or a server's odd answer fails that job and never takes the server out, every job ends in the manifest. The
client (comfy_server) reads at most its limits of a /view body or a websocket message, whatever the server claims
or streams."""
import base64
import hashlib
import io
import json
import os
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import batch  # scripts/ is on sys.path (conftest.py)
import comfy_server

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000")  # any bytes will do for /view
WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "none.png"}, "_meta": {"title": "reference"}},
    "3": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0},
          "_meta": {"title": "case"}},  # the blur radius picks what the server answers for the job
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "faces/with_identity"},
          "_meta": {"title": "Save Image"}},
}
OBJECT_INFO = {
    "LoadImage": {"input": {"required": {"image": [["none.png", "on_server.png"], {"image_upload": True}]}}},
    "ImageBlur": {"input": {"required": {"image": ["IMAGE"], "blur_radius": ["INT", {"min": 1, "max": 31}],
                                         "sigma": ["FLOAT", {"min": 0.1, "max": 10.0}]}}},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {}]}}},
}


DEEP = b"[" * 100_000 + b"]" * 100_000
STREAM_CEILING = 64 << 20  # the most an endless /view body or websocket stream sends before the server gives up


class Hostile(ThreadingHTTPServer):
    """Finishes every prompt at once; what it answers for a prompt depends on its blur radius (`answers`). /view of
    'claims_huge.png' announces a terabyte, of 'endless.png' streams without a length; /ws answers as `ws` says."""
    daemon_threads = True

    def __init__(self, answers):
        super().__init__(("127.0.0.1", 0), Handler)
        self.answers, self.prompts, self.uploads = answers, {}, []
        self.ws, self.sent = None, {}  # sent: bytes each endless stream had sent when the client hung up

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def reply(self, data, code=200, raw=False):
        body = data if raw else json.dumps(data).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path, srv = self.path.split("?")[0], self.server
        if path == "/object_info":
            return self.reply(OBJECT_INFO)
        if path == "/system_stats":
            return self.reply({"system": {}})
        if path == "/queue":
            return self.reply({"queue_running": [], "queue_pending": []})
        if path.startswith("/history/"):
            pid = path.rsplit("/", 1)[1]
            prompt = srv.prompts.get(pid)
            if prompt is None:
                return self.reply({})
            answer = srv.answers(prompt["3"]["inputs"]["blur_radius"])
            return self.reply(answer if not isinstance(answer, dict) or "outputs" not in answer else {pid: answer})
        if path == "/view":
            name = urllib.parse.parse_qs(self.path.partition("?")[2]).get("filename", [""])[0]
            if name == "claims_huge.png":
                self.send_response(200)
                self.send_header("Content-Length", str(10 ** 12))
                self.end_headers()
                return self.endless("view", b"\0" * 65536)
            if name == "endless.png":
                self.send_response(200)  # HTTP/1.0 without Content-Length: the body runs until the server closes
                self.end_headers()
                return self.endless("view", b"\0" * 65536)
            return self.reply(PNG, raw=True)
        if path == "/deep":
            return self.reply(DEEP, raw=True)
        if path == "/drip":   # a byte every 0.2 s: each read is inside any socket timeout, the whole never ends
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            return self.endless("drip", b" ", ceiling=1000, seconds=20.0, pause=0.2)
        if path == "/ws" and srv.ws:
            return self.websocket(srv.ws)
        return self.reply({"error": "not here"}, 404)

    def endless(self, key, chunk, ceiling=STREAM_CEILING, seconds=20.0, pause=0.0):
        sent, stop = 0, time.monotonic() + seconds
        try:
            while sent < ceiling and time.monotonic() < stop:
                self.wfile.write(chunk)
                self.wfile.flush()
                sent += len(chunk)
                time.sleep(pause)
        except OSError:  # the client hung up
            pass
        self.server.sent[key] = sent

    @staticmethod
    def ws_frame(opcode, payload=b"", fin=True, declared=None):
        n = len(payload) if declared is None else declared
        size = bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big") if n < 65536 else bytes([127]) + n.to_bytes(8, "big")
        return bytes([(0x80 if fin else 0) | opcode]) + size + payload

    def websocket(self, mode):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.wfile.write(self.ws_frame(1, json.dumps({"type": "status", "data": {"ok": 1}}).encode()))
        if mode == "deep event":  # JSON nested 100000 deep, then an event
            self.wfile.write(self.ws_frame(1, DEEP) + self.ws_frame(1, json.dumps({"type": "next", "data": {}}).encode()))
            return time.sleep(2)
        if mode == "huge frame":  # a text frame that says it is 2**40 bytes long
            self.wfile.write(self.ws_frame(1, b"", declared=1 << 40))
            return self.endless("ws", b"x" * 65536)
        if mode == "endless fragments":  # a text message that never ends: 64 KiB fragments, none final
            return self.endless("ws", self.ws_frame(1, b"[" * 65536, fin=False) + self.ws_frame(0, b"[" * 65536, fin=False))

    def do_POST(self):
        srv = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/upload/image":
            name = body.split(b'filename="')[1].split(b'"')[0].decode()
            srv.uploads.append(name)
            return self.reply({"subfolder": "", "type": "input"} if "noname" in name else
                              {"name": name, "subfolder": "", "type": "input"})
        if self.path == "/prompt":
            data = json.loads(body)
            pid = data.get("prompt_id") or uuid.uuid4().hex
            srv.prompts[pid] = data["prompt"]
            if data["prompt"]["3"]["inputs"]["blur_radius"] == 7:
                return self.reply({"number": 1, "node_errors": {}})  # no prompt_id
            return self.reply({"prompt_id": pid, "number": 1, "node_errors": {}})
        return self.reply({})


def saved(node_id, filename="x_00001_.png", subfolder=""):
    return {"outputs": {node_id: {"images": [{"filename": filename, "subfolder": subfolder, "type": "output"}]}},
            "status": {"status_str": "success", "completed": True, "messages": []}}


@pytest.fixture
def hostile(request):
    srv = Hostile(request.param)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def run_table(srv, tmp_path, rows, capsys, out=None):
    wf = tmp_path / "workflow.json"
    wf.write_text(json.dumps(WORKFLOW))
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = out or tmp_path / "out"
    rc = batch.main([str(wf), "--url", srv.url, "--out", str(out), "--jobs", str(tmp_path / "jobs.jsonl"),
                     "--no-websocket", "--server-timeout", "5", "--quiet"])
    err = capsys.readouterr().err
    recs = {}
    if os.path.exists(out / "manifest.jsonl"):
        with open(out / "manifest.jsonl") as f:
            recs = {r["job"]: r for r in map(json.loads, f)}
    return rc, err, recs


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def face(tmp_path, name="face.png"):
    (tmp_path / name).write_bytes(PNG)
    return name


TRAVERSAL = {}  # blur radius -> answer, filled by the test (it needs tmp_path for the absolute path)


@pytest.mark.parametrize("hostile", [lambda r: TRAVERSAL[r]], indirect=True)
def test_whatever_the_server_names_files_land_under_out(hostile, tmp_path, capsys):
    """Node ids ../../../X and an absolute path, a filename and subfolder that climb: every file is written under
    --out (named by the SaveImage node, or 'node_<id>' made safe), nothing next to or above it, and nothing at the
    absolute path. Before issue 18 the node id went into the path: OUT/<job>/../../../X_0.png."""
    abs_target = tmp_path / "abs" / "Y"
    TRAVERSAL.update({1: saved("4"), 2: saved("../../../X"), 3: saved(str(abs_target)),
                      4: saved("4", "../../../evil.png", "../../.."), 5: saved("..\\..\\W")})
    out = tmp_path / "a" / "b" / "c" / "out"
    rows = [{"id": f"j{r}", "reference.image": face(tmp_path), "case.blur_radius": r} for r in TRAVERSAL]
    rc, err, recs = run_table(hostile, tmp_path, rows, capsys, out=out)
    print(err)
    outside = [f for f in all_files(tmp_path) if not f.startswith(os.path.join("a", "b", "c", "out") + os.sep)
               and f not in ("workflow.json", "jobs.jsonl", "face.png")]
    assert not outside, outside
    assert not os.path.exists(str(abs_target) + "_0.png") and not (tmp_path / "abs").exists()
    assert rc == 0 and {k: r["status"] for k, r in recs.items()} == {f"j{r}": "done" for r in TRAVERSAL}, (rc, err)
    # the server's node ids made safe (and the files kept): not refused, not followed
    assert [f["file"] for f in recs["j2"]["outputs"]] == [os.path.join("j2", "node_X_0.png")], recs["j2"]
    assert [f["file"] for f in recs["j5"]["outputs"]] == [os.path.join("j5", "node_W_0.png")], recs["j5"]
    assert recs["j3"]["outputs"][0]["file"].startswith(os.path.join("j3", "node_")), recs["j3"]
    for rec in recs.values():
        for f in rec["outputs"]:
            assert os.path.realpath(out / f["file"]).startswith(str(out.resolve()) + os.sep), f
    # named by the SaveImage node's filename_prefix (its last part), not its node id
    assert [f["file"] for f in recs["j1"]["outputs"]] == [os.path.join("j1", "with_identity_0.png")], recs["j1"]
    assert (out / "j1" / "with_identity_0.png").read_bytes() == PNG


ODD = {1: saved("4"), 5: ["not", "an", "entry"], 6: {"outputs": {"4": {"images": [{"filename": 5}]}}},
       8: {"outputs": ["4"], "status": {}}, 9: {"outputs": {"4": {"images": [{"filename": "a.png", "subfolder": ["x"]}]}}}}


@pytest.mark.parametrize("hostile", [lambda r: ODD.get(r, saved("4"))], indirect=True)
def test_odd_answers_fail_their_job_and_the_server_stays(hostile, tmp_path, capsys):
    """An /upload/image answer without `name`, a /prompt answer without prompt_id, history entries of the wrong shape:
    each fails its own job with what was wrong; the other jobs on the same, only server are done (it was never marked
    down: before issue 18 the first odd answer took it out and the batch ended 'no server left')."""
    face(tmp_path, "noname_face.png")
    rows = [{"id": "upload_noname", "reference.image": "noname_face.png", "case.blur_radius": 2},
            {"id": "prompt_no_id", "reference.image": face(tmp_path), "case.blur_radius": 7}]
    rows += [{"id": f"j{r}", "reference.image": "face.png", "case.blur_radius": r} for r in (1, 5, 6, 8, 9, 3)]
    rc, err, recs = run_table(hostile, tmp_path, rows, capsys)
    print(err)
    assert "is down" not in err and "no server left" not in err, err
    assert rc == 1, err
    assert set(recs) == {r["id"] for r in rows}, "every job ends in the manifest"
    status = {k: r["status"] for k, r in recs.items()}
    assert status == {"upload_noname": "failed", "prompt_no_id": "failed", "j1": "done", "j5": "failed",
                      "j6": "failed", "j8": "failed", "j9": "failed", "j3": "done"}, status
    assert "without a file name" in recs["upload_noname"]["error"], recs["upload_noname"]
    assert "prompt_id" in recs["prompt_no_id"]["error"], recs["prompt_no_id"]
    assert "not a history entry" in recs["j5"]["error"], recs["j5"]
    assert "bad filename" in recs["j6"]["error"] and "bad subfolder" in recs["j9"]["error"], (recs["j6"], recs["j9"])


@pytest.mark.parametrize("hostile", [lambda r: saved("4")], indirect=True)
def test_nan_in_a_jsonl_table_is_refused_before_anything_runs(hostile, tmp_path, capsys):
    """Python's JSON parser takes NaN; the table is refused naming the line, nothing is queued. Before issue 18 the
    job was queued, the manifest write raised inside the worker, the healthy server was marked down."""
    rows = [{"reference.image": face(tmp_path), "case.blur_radius": 2}, {"reference.image": "face.png", "case.sigma": 1.5}]
    wf = tmp_path / "workflow.json"
    wf.write_text(json.dumps(WORKFLOW))
    (tmp_path / "jobs.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]).replace("1.5", "NaN") + "\n")
    rc = batch.main([str(wf), "--url", hostile.url, "--out", str(tmp_path / "out"), "--jobs",
                     str(tmp_path / "jobs.jsonl"), "--no-websocket", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "jobs.jsonl line 2" in err and "NaN" in err, err
    assert not hostile.prompts and not (tmp_path / "out").exists()


@pytest.mark.parametrize("hostile", [lambda r: saved("4")], indirect=True)
def test_a_missing_local_file_in_a_table_is_named_before_anything_runs(hostile, tmp_path, capsys):
    """refs/gone.png is neither here nor in the server's input folder (/object_info lists it): refused before any
    upload or prompt, naming the line, the column and the file. A name the server has is taken as the server's."""
    face(tmp_path)
    rows = [{"reference.image": "face.png", "case.blur_radius": 2},
            {"reference.image": "on_server.png", "case.blur_radius": 3},
            {"reference.image": "refs/gone.png", "case.blur_radius": 4}]
    rc, err, recs = run_table(hostile, tmp_path, rows, capsys)
    assert rc == 2 and "jobs.jsonl line 3, reference.image: no file" in err and "gone.png" in err, err
    assert not hostile.prompts and not hostile.uploads and not recs
    rc, err, recs = run_table(hostile, tmp_path, rows[:2], capsys)
    assert rc == 0 and len(recs) == 2, err
    assert sorted(p["1"]["inputs"]["image"] for p in hostile.prompts.values())[1] == "on_server.png"


@pytest.mark.parametrize("hostile", [lambda r: saved("4")], indirect=True)
def test_a_job_the_manifest_cannot_hold_as_json_is_still_recorded(hostile, tmp_path):
    """A Job built by a caller (face_benchmark builds its own) with a NaN value: recorded (the value as text), the
    server stays. Before issue 18 Manifest.append(allow_nan=False) raised inside the worker and took the server out."""
    client = comfy_server.ComfyClient(hostile.url)
    wf = json.loads(json.dumps(WORKFLOW))
    jobs = [batch.Job("nan", 0, {"case.sigma": float("nan")}, [("3", "sigma", 1.0)]),
            batch.Job("fine", 1, {"case.sigma": 1.0}, [("3", "sigma", 1.0)])]
    manifest = batch.Manifest(str(tmp_path / "manifest.jsonl"))
    manifest.open()
    notes = io.StringIO()
    runner = batch.Runner(wf, jobs, [client], collector=batch.download_outputs(str(tmp_path / "out")),
                          manifest=manifest, use_ws=False, server_timeout=5, progress=batch.Progress(2, stream=notes))
    summary = runner.run()
    manifest.close()
    assert summary["done"] == 2 and summary["not_run"] == 0 and runner.workers[0].alive, notes.getvalue()
    with open(tmp_path / "manifest.jsonl") as f:
        recs = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the manifest")) for line in f]
    assert {r["job"]: r["values"]["case.sigma"] for r in recs} == {"nan": "nan", "fine": 1.0}


def test_with_no_server_left_every_job_still_ends_in_the_manifest(tmp_path):
    """Nothing listens at the only URL: the runner gives up after --server-timeout, and each job gets a not_run line
    (which a rerun runs) instead of being left out of the manifest."""
    client = comfy_server.ComfyClient(f"http://127.0.0.1:{comfy_server.free_port()}")
    jobs = [batch.Job(f"j{i}", i, {"case.blur_radius": i}, [("3", "blur_radius", i)]) for i in (1, 2)]
    manifest = batch.Manifest(str(tmp_path / "manifest.jsonl"))
    manifest.open()
    runner = batch.Runner(WORKFLOW, jobs, [client], collector=batch.download_outputs(str(tmp_path)),
                          manifest=manifest, use_ws=False, server_timeout=1)
    summary = runner.run()
    manifest.close()
    assert summary["gave_up"] and summary["not_run"] == 2 and summary["failed"] == 0
    recs = [json.loads(l) for l in open(tmp_path / "manifest.jsonl")]
    assert [(r["job"], r["status"]) for r in recs] == [("j1", "not_run"), ("j2", "not_run")]
    assert "connection refused" in recs[0]["error"]
    assert batch.Manifest(str(tmp_path / "manifest.jsonl")).find(jobs[0])["status"] == "not_run"


# ---- the one HTTP client's limits: whatever a server claims or streams, the client reads a bounded amount ----------
@pytest.mark.parametrize("hostile", [lambda r: saved("4")], indirect=True)
@pytest.mark.parametrize("name", ["claims_huge.png", "endless.png"])
def test_view_reads_at_most_its_limit_and_names_the_server(hostile, name):
    """GET /view read the whole body: a server that announces a terabyte, or streams without a length, made the client
    allocate until memory ran out. Now the announced length is refused before reading, a stream is cut at the limit."""
    client = comfy_server.ComfyClient(hostile.url)
    client.max_view_bytes = 4 << 20
    start = time.monotonic()
    with pytest.raises(comfy_server.AnswerTooLarge) as e:
        client.view({"filename": name, "type": "output"})
    msg = str(e.value)
    assert hostile.url in msg and "4 MiB" in msg and "GET /view" in msg, msg
    assert time.monotonic() - start < 10, "it read for seconds: not refused at the limit"
    time.sleep(0.5)  # the server notices the hang-up
    assert hostile.sent.get("view", 0) < STREAM_CEILING, hostile.sent  # it stopped reading long before the end
    assert client.view({"filename": "x_00001_.png", "type": "output"}) == PNG  # a file under the limit still comes


@pytest.mark.parametrize("hostile", [lambda r: saved("4")], indirect=True)
def test_a_server_that_drips_its_answer_is_a_timeout_not_a_hang(hostile):
    """Each socket read has a timeout, but a server that sends one byte just inside it kept the client reading for as
    long as it liked. Now the whole answer must arrive within the request's timeout."""
    client = comfy_server.ComfyClient(hostile.url)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="too slowly"):
        client.get_json("/drip", timeout=1.0)
    assert time.monotonic() - start < 5, "it kept reading the dripping answer"
    assert client.get_json("/system_stats") == {"system": {}}   # an ordinary answer still comes


def test_the_default_limits_are_far_above_what_comfyui_sends():
    client = comfy_server.ComfyClient("http://127.0.0.1:1")
    assert client.max_view_bytes == 1 << 30 and client.max_answer_bytes == 256 << 20 and client.max_event_bytes == 64 << 20


@pytest.mark.parametrize("hostile", [lambda r: saved("4", "claims_huge.png") if r == 2 else saved("4")], indirect=True)
def test_an_output_file_over_the_limit_fails_its_job_and_the_server_stays(hostile, tmp_path, capsys):
    """The batch runner fetches outputs through the same client: a job whose output is announced at a terabyte fails
    with the limit in its error (nothing written), the other jobs on the same, only server are done."""
    rows = [{"id": f"j{r}", "reference.image": face(tmp_path), "case.blur_radius": r} for r in (1, 2, 3)]
    rc, err, recs = run_table(hostile, tmp_path, rows, capsys)
    assert "is down" not in err and "no server left" not in err, err
    assert {k: r["status"] for k, r in recs.items()} == {"j1": "done", "j2": "failed", "j3": "done"}, (rc, err, recs)
    assert "more than this client's limit of 1024 MiB" in recs["j2"]["error"] and hostile.url in recs["j2"]["error"]
    assert not (tmp_path / "out" / "j2").exists() or not os.listdir(tmp_path / "out" / "j2")


@pytest.mark.parametrize("hostile", [lambda r: saved("4")], indirect=True)
@pytest.mark.parametrize("mode", ["huge frame", "endless fragments"])
def test_a_websocket_message_over_the_limit_is_refused_on_its_header(hostile, mode):
    """The websocket client buffered a frame until it was complete, whatever length its header said, and joined
    fragments without end. Now: the first event still arrives; then a ConnectionError naming the server and the limit
    (what the batch runner's workers already handle: they close the socket and poll), within a second."""
    hostile.ws = mode
    stream = comfy_server.ComfyClient(hostile.url).events()
    stream.max_message = 1 << 20
    try:
        assert stream.recv(timeout=5) == ("status", {"ok": 1})
        start = time.monotonic()
        with pytest.raises(ConnectionError) as e:
            stream.recv(timeout=10)
        assert time.monotonic() - start < 5
    finally:
        stream.close()
    msg = str(e.value)
    assert hostile.url in msg and "1 MiB" in msg, msg
    time.sleep(0.5)
    assert hostile.sent.get("ws", 0) < STREAM_CEILING, hostile.sent



@pytest.mark.parametrize("hostile", [lambda r: saved("4")], indirect=True)
def test_json_nested_too_deep_is_an_unreadable_answer_not_a_recursion_error(hostile):
    """json.loads raises RecursionError, which no caller expected: recv() let it out of the batch runner's event pump
    (which handles ConnectionError), and an answer's RecursionError was not the ValueError that callers take as 'not
    JSON'. Now a deep websocket message is skipped like any non-event, and a deep answer is a ValueError."""
    client = comfy_server.ComfyClient(hostile.url)
    with pytest.raises(ValueError, match="nested too deep"):
        client.get_json("/deep")
    hostile.ws = "deep event"
    stream = client.events()
    try:
        assert stream.recv(timeout=5) == ("status", {"ok": 1})
        assert stream.recv(timeout=5) == ("next", {})
    finally:
        stream.close()
