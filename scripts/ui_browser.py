"""Drive ComfyUI's real web frontend in a headless Chromium (Playwright) against a real server: open the page, load a
workflow, read the graph back, queue it and wait for the websocket events. Used by tests/test_browser*.py and by
scripts/build_ui_workflows.py.

The browser is Debian's `chromium` (found on PATH, or $CHROMIUM); Playwright is only the driver and never downloads
a browser. Python package `playwright` (requirements-test.txt), apt package `chromium` (scripts/setup_host.sh).
"""
from __future__ import annotations

import json
import os
import shutil

CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
PACK_MODULE = "ComfyUI-IDFusion"  # the custom_nodes folder name: templates are listed under it


class BrowserError(RuntimeError):
    pass


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not path:
        raise BrowserError("No chromium on PATH: run scripts/setup_host.sh as root (apt-get install chromium) or set "
                           "$CHROMIUM to a Chromium binary. Playwright's own browser downloads are never used.")
    return path


def seed_user_settings(base_dir: str, settings: dict | None = None):
    """Frontend settings of a fresh user directory. The tour/templates dialog that a first visit opens is switched
    off, so every page load starts on the canvas; the templates test opens that dialog itself."""
    d = os.path.join(base_dir, "user", "default")
    os.makedirs(d, exist_ok=True)
    # screenshots: text stays readable when a whole workflow is zoomed out to fit; no minimap over the canvas
    merged = {"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 1, "Comfy.Minimap.Visible": False,
              **(settings or {})}
    with open(os.path.join(d, "comfy.settings.json"), "w") as f:
        json.dump(merged, f)


class Browser:
    """with Browser() as b: page = b.open(url) ..."""

    def __init__(self, width: int = 1600, height: int = 1000):
        self.size = {"width": width, "height": height}
        self._pw = self._browser = None

    def __enter__(self):
        from playwright.sync_api import sync_playwright
        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        return self

    def __exit__(self, *exc):
        if self._browser is not None:
            self._browser.close()
        if self._pw is not None:
            self._pw.stop()
        return False

    def open(self, url: str):
        """A new page on the ComfyUI app, ready (node definitions registered, extensions loaded); page.idf_errors
        collects page errors and console errors for the tests to inspect."""
        page = self._browser.new_page(viewport=self.size)
        # the "Introducing Nodes 2.0" banner (frontend 1.32.9) would cover the top of every screenshot: dismissed, as
        # its close button does (a localStorage flag)
        page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        page.idf_errors = []
        page.on("pageerror", lambda e: page.idf_errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: m.type == "error" and page.idf_errors.append(f"console: {m.text}"))
        page.goto(url, timeout=120_000)  # a loaded shared machine can take more than the 30 s default
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph && window.app.canvas"
                               " && Object.keys(LiteGraph.registered_node_types).length > 50", timeout=90_000)
        page.wait_for_function("window.app.extensions && window.app.extensions.length > 0", timeout=30_000)
        close_dialogs(page)
        page.evaluate(_LISTEN)
        return page


# websocket events the tests wait for (app.queuePrompt returns false even when it succeeded)
_LISTEN = """async () => {
  const { api } = await import('/scripts/api.js');
  window.__idf = { executed: [], success: [], errors: [], train: [] };
  api.addEventListener('executed', (e) => window.__idf.executed.push(e.detail));
  api.addEventListener('execution_success', (e) => window.__idf.success.push(e.detail));
  api.addEventListener('execution_error', (e) => window.__idf.errors.push(e.detail));
  api.addEventListener('idfusion.train', (e) => window.__idf.train.push(e.detail));
}"""


def close_dialogs(page):
    """Close whatever dialog a page load opened (templates browser, missing nodes): Escape, as a user would. A mask
    left behind with no dialog in it (seen on a loaded machine after the templates browser closed) blocks every click:
    then the page is reloaded, as a user would, and made ready again."""
    for _ in range(10):  # a closing (or still opening) dialog's mask also blocks clicks: wait until it is gone
        if not page.locator(".p-dialog, .p-dialog-mask").count():
            return
        if page.locator(".p-dialog").count():
            page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    page.reload(timeout=120_000)
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph && window.app.canvas"
                           " && Object.keys(LiteGraph.registered_node_types).length > 50", timeout=90_000)
    page.wait_for_function("window.app.extensions && window.app.extensions.length > 0", timeout=30_000)
    for _ in range(10):
        if not page.locator(".p-dialog, .p-dialog-mask").count():
            break
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    page.evaluate(_LISTEN)


def load_ui(page, workflow: dict, name: str = "workflow"):
    """app.loadGraphData, what dropping a UI-format file on the canvas does (on a page with no dialog in the way)."""
    close_dialogs(page)
    page.evaluate("([wf, name]) => app.loadGraphData(wf, true, true, name)", [workflow, name])
    page.wait_for_timeout(300)


def load_api(page, prompt: dict, name: str = "workflow"):
    page.evaluate("([p, name]) => app.loadApiJson(p, name)", [prompt, name])
    page.wait_for_timeout(300)


def serialize(page) -> dict:
    """The graph as the frontend saves it (JSON.stringify drops its undefined fields; passed raw they would
    arrive as nulls, which its own schema check rejects on load)."""
    return page.evaluate("() => JSON.parse(JSON.stringify(app.graph.serialize()))")


def toasts(page) -> list[str]:
    return page.evaluate("() => [...document.querySelectorAll('.p-toast-message')].map((e) => e.innerText)")


def clear_toasts(page):
    page.evaluate("() => { app.extensionManager.toast.removeAll?.(); }")
    page.wait_for_timeout(100)


def graph_to_prompt(page) -> dict:
    return page.evaluate("async () => (await app.graphToPrompt()).output")


def graph_summary(page) -> list[dict]:
    """Each node as the page sees it: id, type, registered?, widget names, input names, title, pos, size."""
    return page.evaluate("""() => app.graph._nodes.map((n) => ({
        id: n.id, type: n.type, title: n.title, registered: !!LiteGraph.registered_node_types[n.type],
        has_errors: !!n.has_errors, widgets: (n.widgets || []).map((w) => w.name),
        inputs: (n.inputs || []).map((i) => i.name), pos: [...n.pos], size: [...n.size],
        mode: n.mode }))""")


def fit_node(page, node_id, scale: float = 1.0):
    """Bring a node on screen (node.imgs is only filled for visible nodes) at a given zoom."""
    page.evaluate("""([id, scale]) => { const n = app.graph.getNodeById(id); const ds = app.canvas.ds;
        ds.scale = scale; const c = app.canvas.canvas;
        ds.offset[0] = -n.pos[0] - n.size[0] / 2 + c.width / (2 * scale * (window.devicePixelRatio || 1));
        ds.offset[1] = -n.pos[1] - n.size[1] / 2 + c.height / (2 * scale * (window.devicePixelRatio || 1));
        app.canvas.setDirty(true, true); }""", [node_id, scale])
    page.wait_for_timeout(300)


def fit_all(page):
    """Zoom so the whole graph is on screen."""
    page.evaluate("""() => { const ns = app.graph._nodes; if (!ns.length) return;
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        for (const n of ns) { x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 40);
          x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]); }
        for (const g of app.graph._groups || []) { const [gx, gy, gw, gh] = g._bounding || g.bounding;
          x0 = Math.min(x0, gx); y0 = Math.min(y0, gy); x1 = Math.max(x1, gx + gw); y1 = Math.max(y1, gy + gh); }
        const c = app.canvas.canvas, dpr = window.devicePixelRatio || 1, w = c.width / dpr, h = c.height / dpr;
        const top = 130;  // the menu bar and tabs cover the top of the canvas
        const s = Math.min(w / (x1 - x0 + 80), (h - top) / (y1 - y0 + 80), 1.2);
        const ds = app.canvas.ds; ds.scale = s;
        ds.offset[0] = -x0 + 40 / s + (w / s - (x1 - x0 + 80)) / 2; ds.offset[1] = -y0 + (top + 40) / s;
        app.canvas.setDirty(true, true); }""")
    page.wait_for_timeout(300)


def reset_events(page):
    page.evaluate("() => { window.__idf.executed = []; window.__idf.success = []; window.__idf.errors = []; window.__idf.train = []; }")


def press_run(page):
    """Click the action bar's Run button, as a user does."""
    page.get_by_role("button", name="Run", exact=True).first.click()


def error_dialog_text(page, timeout_s: float = 30.0) -> str:
    """The text of the error dialog the page opens when the server refuses a prompt (validation errors)."""
    page.wait_for_selector(".p-dialog", timeout=timeout_s * 1000)
    return page.evaluate("() => [...document.querySelectorAll('.p-dialog')].map((d) => d.innerText).join('\\n')")


def queue(page, timeout_s: float = 300.0, click: bool = False) -> dict:
    """Queue the graph as the Run button does (click=True: by clicking it) and wait for execution_success (or raise
    on execution_error). Returns window.__idf: executed events (node, output), success and train messages."""
    reset_events(page)
    if click:
        press_run(page)
    else:
        page.evaluate("() => app.queuePrompt(0, 1)")
    page.wait_for_function("window.__idf.success.length + window.__idf.errors.length > 0"
                           " || document.querySelector('.comfy-missing-nodes, .p-dialog .error, [data-testid=\"error-dialog\"]')",
                           timeout=timeout_s * 1000)
    state = page.evaluate("() => window.__idf")
    if state["errors"]:
        e = state["errors"][0]
        raise BrowserError(f"execution_error in node {e.get('node_id')} ({e.get('node_type')}): "
                           f"{e.get('exception_type')}: {e.get('exception_message')}")
    if not state["success"]:
        raise BrowserError("The prompt was not queued: the page shows an error dialog. "
                           + page.evaluate("() => document.querySelector('.p-dialog')?.innerText || ''")[:2000])
    return state


def screenshot(page, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    page.wait_for_timeout(200)
    page.screenshot(path=path)
    return path


def node_screen_rect(page, node_id) -> tuple[float, float, float, float]:
    """The node's body (below its title bar) in page pixels: (x, y, w, h)."""
    return tuple(page.evaluate("""(id) => { const n = app.graph.getNodeById(id); const ds = app.canvas.ds;
        const r = app.canvas.canvas.getBoundingClientRect();
        const [x, y] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1]]);
        return [r.left + x, r.top + y, n.size[0] * ds.scale, n.size[1] * ds.scale]; }""", node_id))


def region_pixels(page, rect):
    """An RGB numpy array of what the page shows inside rect (x, y, w, h), from a screenshot."""
    import io
    import numpy as np
    from PIL import Image
    x, y, w, h = (int(round(v)) for v in rect)
    png = page.screenshot(clip={"x": x, "y": y, "width": max(1, w), "height": max(1, h)})
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
