"""The UI-format example workflows (workflows/*.json) in the REAL frontend: one ComfyUI server (host 0.3.75, frontend
1.32.9) with this pack linked in, driven by a headless Debian chromium through Playwright.

- Every template ComfyUI lists for the pack opens from the Templates browser (sidebar > Extensions > the pack > card)
  as the complete graph.
- Every UI file loads with no missing node types or widgets, has a readable layout (no overlapping nodes, one group
  and one Note per stage, titles, fixed seeds), and app.graphToPrompt() gives exactly its workflows/api/ twin
  (node ids, inputs, class types and titles; nothing is ignored).
Screenshots: <tmp>/screens and /work/helpers/screens (if that folder exists) or $IDFUSION_SCREENS.
"""
import json
import os

import pytest

import ui_browser  # scripts/ is on sys.path (conftest.py)
from conftest import ROOT, running_server

pytestmark = pytest.mark.e2e

WORKFLOWS = os.path.join(ROOT, "workflows")
UI_FILES = sorted(f[:-5] for f in os.listdir(WORKFLOWS) if f.endswith(".json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def twin_of(name):
    return os.path.join(WORKFLOWS, "api", f"{name}_api.json")


def load(name):
    with open(os.path.join(WORKFLOWS, f"{name}.json")) as f:
        return json.load(f)




@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import sys
    base = tmp_path_factory.mktemp("comfy_base_ui")
    ui_browser.seed_user_settings(str(base))
    with running_server(str(base)) as srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def test_every_ui_workflow_has_an_api_twin_and_templates_are_only_ui_files(server):
    assert set(UI_FILES) >= {"idfusion_basic", "idfusion_multi_identity", "idfusion_face_repaint",
                             "idfusion_face_benchmark", "idfusion_training"}, UI_FILES
    for name in UI_FILES:
        wf = load(name)
        assert "nodes" in wf and "links" in wf, f"workflows/{name}.json is not UI format (API files go in workflows/api/)"
        assert os.path.isfile(twin_of(name)), f"workflows/{name}.json has no twin workflows/api/{name}_api.json"
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
    dialog.get_by_text(name, exact=True).first.click()
    page.wait_for_function("() => !document.querySelector('.p-dialog') && app.graph._nodes.length > 0", timeout=30_000)
    page.wait_for_timeout(500)
    expected = load(name)
    got = ui_browser.graph_summary(page)
    assert sorted((n["id"], n["type"]) for n in got) == sorted((n["id"], n["type"]) for n in expected["nodes"])
    assert all(n["registered"] and not n["has_errors"] for n in got), [n for n in got if not n["registered"]]
    assert len(page.evaluate("() => app.graph._groups")) == len(expected["groups"])
    assert not [t for t in ui_browser.toasts(page) if "invalid" in t.lower()], ui_browser.toasts(page)
    ui_browser.fit_all(page)
    screens(page, f"template_{name}")


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
        assert v.get("_meta", {}).get("title"), f"{name}_api.json: node {k} has no title"
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
    screens(page, f"workflow_{name}")


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
