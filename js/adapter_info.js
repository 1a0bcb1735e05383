// Load Adapter / Load Identity: when a file is picked, show what its safetensors metadata says (family, layer
// count, how references were encoded, training steps / references) from the read-only GET /idfusion/file_info
// route (nodes/routes.py). The route takes a name from the node's own list, never a path.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { COLORS, addPanel, chain, panelElement, toast, widget } from "./idfusion_common.js";

const NODES = { IDFusionAdapterLoader: "adapter_name", IDFusionLoadIdentity: "identity_name" };

function encodingText(e) {
  if (!e || typeof e !== "object") return "not recorded";
  return [e.mode, e.timestep !== undefined ? `timestep ${e.timestep}` : null, e.text ? `text ${e.text}` : null].filter(Boolean).join(", ");
}

function stepsText(t) {
  if (!t) return "not recorded";
  return t.planned ? `${t.done} of ${t.planned}` : `${t.done}`;
}

export function describe(info) {
  const lines = [`family: ${info.family ?? "unknown"}   layers: ${info.layers ?? "?"}`];
  if (info.format === "idfusion.identity") {
    lines.push(`identity: ${info.identity_name ?? "?"}   references: ${info.references ?? "?"}`);
    lines.push(`h_f: ${info.h_f ?? "?"}`);
    lines.push(`encoded: ${encodingText(info.reference_encoding)}`);
  } else {
    lines.push(`encoded: ${encodingText(info.reference_encoding)}`);
    lines.push(`training steps: ${stepsText(info.training_steps)}`);
  }
  return lines.join("\n");
}

// grow the node so the whole panel shows (never shrink what the user sized)
function fit(node) {
  const [w, h] = node.computeSize();
  node.setSize([Math.max(node.size[0], w, 420), Math.max(node.size[1], h)]);
  node.setDirtyCanvas?.(true, true);
}

async function refresh(node) {
  const el = node.__idfusionInfo;
  const name = widget(node, NODES[node.comfyClass])?.value;
  if (!el || name === node.__idfusionInfoName) return;
  node.__idfusionInfoName = name;
  if (!name) {
    el.textContent = "no file in models/idfusion";
    el.dataset.state = "empty";
    return;
  }
  el.textContent = `reading ${name} ...`;
  el.dataset.state = "loading";
  let info;
  try {
    const r = await api.fetchApi(`/idfusion/file_info?name=${encodeURIComponent(name)}`);
    info = await r.json();
    if (!r.ok) throw Object.assign(new Error(info?.error || `HTTP ${r.status}`), { status: r.status });
  } catch (e) {
    if (node.__idfusionInfoName !== name) return;
    el.textContent = `metadata unavailable: ${e.message}`;
    el.style.color = COLORS.bad;
    el.dataset.state = "error";
    fit(node);
    // a file that is not there is already flagged by the combo; a file that is there but unreadable is news
    if (e.status !== 404) toast("warn", "IDFusion: cannot read file metadata", `${name}: ${e.message}`);
    return;
  }
  if (node.__idfusionInfoName !== name) return; // a newer pick won
  el.style.color = COLORS.text;
  el.textContent = describe(info);
  el.dataset.state = "ok";
  el.dataset.family = String(info.family);
  el.dataset.layers = String(info.layers);
  fit(node);
}

app.registerExtension({
  name: "IDFusion.adapterInfo",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!(nodeData.name in NODES)) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      this.__idfusionInfo = panelElement("idfusion-file-info");
      const el = this.__idfusionInfo;
      // 18 px per line, 8 px padding, and the 10 px the widget layout keeps around a DOM widget
      addPanel(this, "idfusion_file_info", el, () => 18 * Math.max(1, el.textContent.split("\n").length) + 18);
      const w = widget(this, NODES[nodeData.name]);
      if (w) chain(w, "callback", () => refresh(this));
      requestAnimationFrame(() => refresh(this));
    });
    // loading a workflow sets widget values without calling their callbacks
    chain(nodeType.prototype, "onConfigure", function () {
      requestAnimationFrame(() => refresh(this));
    });
  },
});
