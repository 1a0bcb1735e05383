"""The UI-format example workflows (workflows/*.json, the pack's templates) in the REAL frontend: one ComfyUI server
(host 0.3.75, frontend 1.32.9) with this pack linked in and nothing else installed (a fresh host), driven by a headless
Debian chromium through Playwright.

- The Templates browser (sidebar > Templates > Extensions > the pack) shows every template with its human title and a
  thumbnail that loads (no 404); the demo is marked as the place to start and sorts first.
- Every template opens from the browser as the complete graph; every UI file loads with no missing node types or
  widgets, has a readable layout (no overlapping nodes, one group and one Note per stage, titles, fixed seeds), and
  app.graphToPrompt() gives exactly its workflows/api/ twin (nothing is ignored).
- Every template runs as shipped when Run is pressed, or needs the user's own files (an SD1.5 checkpoint; Flux's
  diffusion model, text encoders and VAE): then its Notes name each file by its usual name, the ComfyUI/models folder
  it goes in and where it comes from, and Run shows an error in the UI naming the input to set, and nothing runs. No
  template names a file that neither the pack nor a stock ComfyUI provides. (The Flux template runs end to end on
  random files under its file names in test_flux_template_e2e.py.)
- A missing reference stops the whole prompt with an error in the UI (never a silent half run).
Screenshots: <tmp>/screens and $IDFUSION_SCREENS.
"""
import json
import os
import shutil
import urllib.parse

import pytest

import build_ui_workflows as build  # scripts/ is on sys.path (conftest.py): the templates' names, twins and files
import ui_browser
from conftest import COMFYUI, ROOT, running_server

pytestmark = pytest.mark.e2e

WORKFLOWS = os.path.join(ROOT, "workflows")
UI_FILES = sorted(f[:-5] for f in os.listdir(WORKFLOWS) if f.endswith(".json"))
DEMO = build.ui_name("idfusion_synthetic_demo")
RUNS = [n for n in UI_FILES if build.SPECS.get(n, {}).get("runs")]
NEEDS_USER_FILES = [n for n in UI_FILES if not build.SPECS.get(n, {}).get("runs")]
USER_FILES = build.USER_FILES  # the user's own files, named by their usual names
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def twin_of(name):
    return os.path.join(WORKFLOWS, "api", build.SPECS[name]["twin"])


def load(name):
    with open(os.path.join(WORKFLOWS, f"{name}.json")) as f:
        return json.load(f)


def notes(name) -> str:
    return "\n".join(n["widgets_values"][0] for n in load(name)["nodes"] if n["type"] in ("Note", "MarkdownNote"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A fresh host: this pack and a stock ComfyUI's own input/example.png, nothing copied by hand."""
    base = tmp_path_factory.mktemp("comfy_base_ui")
    ui_browser.seed_user_settings(str(base))
    os.makedirs(base / "input")
    stock = os.path.join(COMFYUI, "input", "example.png")
    if os.path.isfile(stock):
        shutil.copyfile(stock, base / "input" / "example.png")
    with running_server(str(base)) as srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def test_every_ui_workflow_has_an_api_twin_and_templates_are_only_ui_files(server):
    assert set(UI_FILES) == set(build.SPECS), "workflows/*.json and build_ui_workflows.SPECS differ"
    for name in UI_FILES:
        wf = load(name)
        assert "nodes" in wf and "links" in wf, f"workflows/{name}.json is not UI format (API files go in workflows/api/)"
        assert os.path.isfile(twin_of(name)), f"workflows/{name}.json has no twin {twin_of(name)}"
    listed = server.get_json("/api/workflow_templates")
    assert sorted(listed.get(ui_browser.PACK_MODULE, [])) == UI_FILES, listed


@pytest.mark.parametrize("name", UI_FILES)
def test_template_opens_from_templates_browser_as_complete_graph(page, screens, name):
    """What a user does: Templates > Extensions > ComfyUI-IDFusion > the card. The frontend fetches
    /api/workflow_templates/<pack>/<name>.json and loads it as a UI graph."""
    page.evaluate("() => app.graph.clear()")
    ui_browser.clear_toasts(page)
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.locator(".p-dialog")
    dialog.get_by_role("button", name=ui_browser.PACK_MODULE).click()
    dialog.locator("h3", has_text=name).first.click()
    page.wait_for_function("() => !document.querySelector('.p-dialog') && app.graph._nodes.length > 0", timeout=30_000)
    page.wait_for_timeout(500)
    expected = load(name)
    got = ui_browser.graph_summary(page)
    assert sorted((n["id"], n["type"]) for n in got) == sorted((n["id"], n["type"]) for n in expected["nodes"])
    assert all(n["registered"] and not n["has_errors"] for n in got), [n for n in got if not n["registered"]]
    assert len(page.evaluate("() => app.graph._groups")) == len(expected["groups"])
    assert not [t for t in ui_browser.toasts(page) if "invalid" in t.lower()], ui_browser.toasts(page)
    ui_browser.fit_all(page)
    screens(page, f"template_{name.split(' ')[0]}")


def _rect(n):  # the node's box including its title bar, drawn above pos
    x, y = n["pos"]
    w, h = n["size"]
    return x, y - 30, x + w, y + h


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _inside(r, g):
    x, y, w, h = g["bounding"]
    return x <= r[0] and y <= r[1] and r[2] <= x + w and r[3] <= y + h


@pytest.mark.parametrize("name", UI_FILES)
def test_ui_workflow_layout_is_readable(name):
    """No overlapping nodes; one group per stage, each with exactly one Note; every node in exactly one group;
    titled nodes; seeds fixed."""
    wf = load(name)
    nodes = wf["nodes"]
    rects = {n["id"]: _rect(n) for n in nodes}
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            assert not _overlap(rects[a["id"]], rects[b["id"]]), f"{name}: nodes {a['id']} and {b['id']} overlap"
    groups = wf["groups"]
    assert len(groups) >= 2, f"{name}: needs a group per stage"
    for i, g in enumerate(groups):
        assert g["title"], g
        members = [n for n in nodes if _inside(rects[n["id"]], g)]
        notes = [n for n in members if n["type"] in ("Note", "MarkdownNote")]
        assert len(notes) == 1 and notes[0]["widgets_values"][0].strip(), f"{name}: group '{g['title']}' needs one Note"
        assert len(members) > 1, f"{name}: group '{g['title']}' holds no node"
        for h in groups[i + 1:]:
            x, y, w, hh = h["bounding"]
            assert not _overlap((x, y, x + w, y + hh), (g["bounding"][0], g["bounding"][1],
                                g["bounding"][0] + g["bounding"][2], g["bounding"][1] + g["bounding"][3])), (g, h)
    for n in nodes:
        assert sum(_inside(rects[n["id"]], g) for g in groups) == 1, f"{name}: node {n['id']} must be in exactly one group"
    api = json.load(open(twin_of(name)))
    for k, v in api.items():
        assert v.get("_meta", {}).get("title"), f"{twin_of(name)}: node {k} has no title"
        for key in ("seed", "noise_seed"):
            if key in v["inputs"]:
                ui = next(n for n in nodes if str(n["id"]) == k)
                assert "fixed" in ui["widgets_values"], f"{name}: node {k}'s seed is not fixed: {ui['widgets_values']}"
                assert "randomize" not in ui["widgets_values"]


@pytest.mark.parametrize("name", UI_FILES)
def test_ui_workflow_loads_with_no_missing_nodes_or_widgets(page, object_info, screens, name):
    wf = load(name)
    ui_browser.clear_toasts(page)
    ui_browser.load_ui(page, wf, name)
    page.wait_for_timeout(300)
    assert not [t for t in ui_browser.toasts(page) if "invalid" in t.lower()], ui_browser.toasts(page)
    got = {n["id"]: n for n in ui_browser.graph_summary(page)}
    assert len(got) == len(wf["nodes"])
    missing_types = sorted({n["type"] for n in got.values() if not n["registered"] or n["has_errors"]})
    assert not missing_types, f"{name}: missing node types {missing_types}"
    for n in wf["nodes"]:
        if n["type"] in ("Note", "MarkdownNote"):
            continue
        info = object_info[n["type"]]["input"]
        p = got[n["id"]]
        for section in ("required", "optional"):
            for inp, spec in (info.get(section) or {}).items():
                kind = spec[0]
                if isinstance(kind, list) or kind in WIDGET_TYPES:
                    assert inp in p["widgets"] or inp in p["inputs"], f"{name}: node {n['id']} ({n['type']}) has no widget '{inp}'"
    # the values the file holds are the values the page shows: nothing was dropped, shifted or migrated
    saved = {n["id"]: n.get("widgets_values") for n in ui_browser.serialize(page)["nodes"]}
    for n in wf["nodes"]:
        assert saved[n["id"]] == n.get("widgets_values"), f"{name}: node {n['id']} widgets_values changed on load"
    ui_browser.fit_all(page)
    screens(page, f"workflow_{name.split(' ')[0]}")


@pytest.mark.parametrize("name", UI_FILES)
def test_graph_to_prompt_equals_api_twin(page, name):
    """The UI file and workflows/api/<name>_api.json never drift apart: the API prompt the page builds from the UI
    file is the twin, node for node (ids, class_type, every input value and link, _meta titles). Notes are
    frontend-only and never in a prompt."""
    ui_browser.load_ui(page, load(name), name)
    prompt = ui_browser.graph_to_prompt(page)
    with open(twin_of(name)) as f:
        twin = json.load(f)
    assert set(prompt) == set(twin), f"{name}: node ids differ: ui {sorted(prompt)} vs api {sorted(twin)}"
    for k in twin:
        assert prompt[k] == twin[k], f"{name}: node {k} differs:\n ui  {prompt[k]}\n api {twin[k]}"


def open_pack_templates(page):
    page.evaluate("() => app.graph.clear()")
    ui_browser.clear_toasts(page)
    ui_browser.close_dialogs(page)
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.locator(".p-dialog")
    dialog.get_by_role("button", name=ui_browser.PACK_MODULE).click()
    return dialog


def pack_titles(page) -> list[str]:
    return [t for t in page.evaluate("() => [...document.querySelectorAll('.p-dialog h3')].map((h) => h.innerText.trim())")
            if t in UI_FILES]


def test_templates_browser_shows_human_titles_thumbnails_and_the_demo_first(page, server, screens):
    """Frontend 1.32.9 titles a custom node's template by its file name and fetches <name>.jpg next to it for the
    card: every card shows its human title and a thumbnail that loads (no request for the pack's templates fails).
    The demo says it is the place to start and comes first in the Alphabetical sort (the browser's default lists a
    pack's templates in its folder's order: alphabetical on Windows and macOS, arbitrary on Linux file systems)."""
    responses = []

    def on_response(r):
        if f"/workflow_templates/{ui_browser.PACK_MODULE}/" in r.url:
            responses.append((r.status, urllib.parse.unquote(r.url.split(f"/{ui_browser.PACK_MODULE}/", 1)[1])))
    page.on("response", on_response)
    viewport = page.viewport_size
    page.set_viewport_size({"width": viewport["width"], "height": 1800})  # the dialog renders (and fetches) only the
    try:                                                                   # cards on screen: all of them, here
        dialog = open_pack_templates(page)
        dialog.locator("h3", has_text=DEMO).first.wait_for(timeout=30_000)
        # the cards load their thumbnail through fetch into blob: URLs; wait until every card's picture has decoded
        page.wait_for_function("""(n) => { const imgs = [...document.querySelectorAll('.p-dialog img')];
            return imgs.length >= n && imgs.every((i) => i.complete); }""", arg=len(UI_FILES), timeout=30_000)
        page.wait_for_timeout(500)
        titles = pack_titles(page)
        decoded = page.evaluate("() => [...document.querySelectorAll('.p-dialog img')].filter((i) => i.naturalWidth > 0).length")
        # each card's own picture, found from its title: a card opened by an earlier test may be served from the
        # frontend's or the browser's cache with no network response to see here
        card_pictures = page.evaluate("""(names) => Object.fromEntries(names.map((n) => {
            const h = [...document.querySelectorAll('.p-dialog h3')].find((e) => e.innerText.trim() === n);
            let card = h;
            while (card && !card.querySelector('img')) card = card.parentElement;
            const img = card && card.querySelector('img');
            return [n, img ? img.naturalWidth : -1]; }))""", UI_FILES)
        served = {name: page.request.get(f"{server.url}/api/workflow_templates/{ui_browser.PACK_MODULE}/"
                                         f"{urllib.parse.quote(name)}.jpg") for name in UI_FILES}
        served = {name: (r.status, r.headers.get("content-type", "")) for name, r in served.items()}
        screens(page, "templates_browser")
    finally:
        page.remove_listener("response", on_response)
        ui_browser.close_dialogs(page)
        page.set_viewport_size(viewport)
    assert sorted(titles) == UI_FILES, titles
    for name in UI_FILES:
        assert os.path.isfile(os.path.join(WORKFLOWS, f"{name}.jpg")), f"workflows/{name}.jpg is missing"
        assert served[name][0] == 200 and served[name][1].startswith("image/"), f"the thumbnail of '{name}': {served[name]}"
        assert card_pictures[name] > 0, f"the card '{name}' shows no decoded picture ({card_pictures})"
    assert decoded >= len(UI_FILES), f"only {decoded} card pictures decoded"
    assert not [r for r in responses if r[0] >= 400], responses
    for name in UI_FILES:
        assert name[0].isdigit() and " " in name and "_" not in name, f"'{name}' is not a human title"
    assert "start here" in DEMO.lower()


@pytest.mark.parametrize("name", RUNS)
def test_template_runs_as_shipped_when_run_is_pressed(page, screens, name):
    """A fresh host, the template as shipped (its files, references, dataset and wiring), the Run button: every
    output node gets its pictures. Only the step counts are cut to 2 (samplers, training), as a user trying it quickly
    would, so the test stays short on a shared CPU."""
    ui_browser.close_dialogs(page)
    ui_browser.load_ui(page, load(name), name)
    page.evaluate("""() => { for (const n of app.graph._nodes) for (const w of n.widgets || [])
        if (w.name === 'steps') { w.value = 2; w.callback?.(2); } }""")
    state = ui_browser.queue(page, timeout_s=900, click=True)
    outputs = {str(n["id"]) for n in load(name)["nodes"] if n["type"] in ("SaveImage", "PreviewImage")}
    got = {str(e["node"]) for e in state["executed"] if (e.get("output") or {}).get("images")}
    assert outputs and outputs <= got, (outputs, got)
    ui_browser.fit_all(page)
    screens(page, f"ran_{name.split(' ')[0]}")


@pytest.mark.parametrize("name", NEEDS_USER_FILES)
def test_template_that_needs_your_files_says_which_and_where_they_come_from(page, object_info, name):
    """Its Notes name each file the user must provide by its usual name, the ComfyUI/models folder it goes in and where
    it comes from; Run on a fresh host shows an error in the UI that names the first input to set and its file, and
    nothing runs."""
    with open(twin_of(name)) as f:
        twin = json.load(f)
    needs = build.SPECS[name].get("needs")
    assert needs, f"{name}: a template that is not run as shipped must say which of the user's files it needs"
    mine = {(k, v) for n in twin.values() for k, v in n["inputs"].items() if isinstance(v, str) and v in USER_FILES}
    assert mine == {(inp, f) for inp, f, _ in needs}, (mine, needs)
    text = notes(name)
    for _, f, folder in needs:
        assert f in text, f"{name}: no Note names {f}"
        assert f"ComfyUI/models/{folder}" in text, f"{name}: no Note says {f} goes in ComfyUI/models/{folder}"
    assert "Hugging Face" in text, text
    ui_browser.close_dialogs(page)
    ui_browser.load_ui(page, load(name), name)
    ui_browser.reset_events(page)
    ui_browser.press_run(page)
    shown = ui_browser.error_dialog_text(page)
    ui_browser.close_dialogs(page)
    assert needs[0][0] in shown and needs[0][1] in shown, shown
    assert not page.evaluate("() => window.__idf.executed.length + window.__idf.success.length")


@pytest.mark.parametrize("name", UI_FILES)
def test_no_template_names_a_file_a_fresh_install_lacks(object_info, name):
    """Every file-list input (checkpoint, adapter, reference, dataset, model) names a file this fresh host lists,
    i.e. one the pack or a stock ComfyUI ships, or the user's checkpoint/adapter by its usual name."""
    with open(twin_of(name)) as f:
        twin = json.load(f)
    for nid, node in twin.items():
        spec = object_info[node["class_type"]]["input"]
        for section in ("required", "optional"):
            for inp, opts in (spec.get(section) or {}).items():
                v = node["inputs"].get(inp)
                if isinstance(opts[0], list) and isinstance(v, str) and v not in opts[0]:
                    assert v in USER_FILES, f"{name}: node {nid} ({node['class_type']}).{inp} = {v!r} is in no list"


@pytest.mark.parametrize("name,node", [(DEMO, "3"), (build.ui_name("idfusion_synthetic_two_identities"), "5")]
                         + ([(build.FLUX_DEMO, "3")] if build.FLUX_DEMO in build.SPECS else []))
def test_a_missing_reference_stops_the_whole_prompt_with_an_error_in_the_ui(page, server, screens, name, node):
    """A reference the host does not have (a renamed or deleted file): Run shows an error naming it and NOTHING runs,
    not even the branches that do not use it (every output depends on every reference)."""
    ui_browser.close_dialogs(page)
    ui_browser.load_ui(page, load(name), name)
    page.evaluate("""(id) => { const w = app.graph.getNodeById(id).widgets.find((w) => w.name === 'image');
        w.value = 'my_face_that_is_not_there.png'; }""", int(node))
    history = len(server.get_json("/api/history"))
    ui_browser.reset_events(page)
    ui_browser.press_run(page)
    shown = ui_browser.error_dialog_text(page)
    screens(page, f"missing_reference_{name.split(' ')[0]}")
    ui_browser.close_dialogs(page)
    assert "my_face_that_is_not_there.png" in shown, shown
    page.wait_for_timeout(2000)
    assert not page.evaluate("() => window.__idf.executed.length + window.__idf.success.length"), "part of it ran"
    assert len(server.get_json("/api/history")) == history and not any(server.get_json("/api/queue").values())


def test_the_demo_comes_first_in_the_templates_browsers_alphabetical_sort(page):
    """Last in this module: the sort menu leaves an overlay that blocks later clicks on the page."""
    # the dialog's sort menu, as a user picks it
    try:
        dialog = open_pack_templates(page)
        dialog.locator("h3", has_text=DEMO).first.wait_for(timeout=30_000)
        dialog.get_by_text("Newest", exact=True).first.click()
        page.get_by_role("option", name="A → Z").click()  # "Alphabetical (A-Z)" in 1.32.9's English labels
        page.wait_for_timeout(500)
        assert pack_titles(page)[0] == DEMO, pack_titles(page)
    finally:
        ui_browser.close_dialogs(page)
        page.evaluate("() => app.extensionManager.setting.set('Comfy.Templates.SortBy', 'newest')")


def test_pyproject_has_registry_metadata_that_comfyui_reads():
    """pyproject.toml for the ComfyUI Registry: [project] and [tool.comfy] fields as the registry specifies them,
    the dependencies of requirements.txt, an icon that exists in the repository, and the file parsed by the host's own
    reader (comfy_config, what ComfyUI runs on the pack at start-up) to the same values."""
    import re
    import tomllib
    from PIL import Image
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        toml = tomllib.load(f)
    project, comfy = toml["project"], toml["tool"]["comfy"]
    # registry node id: <100 chars, alphanumerics with single - _ . between, starts with a letter, no "ComfyUI"
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", project["name"]) and len(project["name"]) < 100
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    assert project["description"].strip() and project["urls"]["Repository"].startswith("https://")
    assert project["license"] == {"file": "LICENSE"}, project.get("license")
    with open(os.path.join(ROOT, "LICENSE")) as f:  # GPL-3.0, the full text
        text = f.read()
    assert "GNU GENERAL PUBLIC LICENSE" in text[:200] and "Version 3, 29 June 2007" in text[:200] and len(text) > 30000
    reqs = [l.split("#")[0].strip() for l in open(os.path.join(ROOT, "requirements.txt"))]
    assert project["dependencies"] == [r for r in reqs if r], "pyproject dependencies drifted from requirements.txt"
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert isinstance(comfy.get(key), str) and comfy[key].strip(), f"[tool.comfy] {key} is missing"
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"]), comfy["PublisherId"]
    assert "web" not in comfy, "WEB_DIRECTORY already serves js/; a `web` key would load the extension twice"
    assert comfy["includes"] and all(os.path.isdir(os.path.join(ROOT, d)) for d in comfy["includes"]), comfy["includes"]
    icon = comfy["Icon"].split("/main/", 1)[1]
    assert comfy["Icon"].startswith(project["urls"]["Repository"].replace("github.com", "raw.githubusercontent.com"))
    with Image.open(os.path.join(ROOT, icon)) as im:
        assert im.format == "PNG" and im.size[0] == im.size[1] >= 128, (im.format, im.size)
    from comfy_config import config_parser  # the host's reader (0.3.75)
    cfg = config_parser.extract_node_configuration(ROOT)
    assert cfg is not None and cfg.project.name == project["name"] and cfg.project.version == project["version"]
    assert cfg.tool_comfy.publisher_id == comfy["PublisherId"] and cfg.tool_comfy.display_name == comfy["DisplayName"]
    assert cfg.tool_comfy.icon == comfy["Icon"] and cfg.tool_comfy.includes == comfy["includes"] and cfg.tool_comfy.web is None
    assert cfg.project.urls.repository == project["urls"]["Repository"]
