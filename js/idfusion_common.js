// Shared helpers for the IDFusion web extensions (no extension is registered here).
// The page only presents what the server sent (ui outputs, send_sync messages, the read-only file_info route);
// nothing a workflow run depends on is decided here, so API users lose nothing without this folder.
import { app } from "../../scripts/app.js";

export const COLORS = { ok: "#3fb950", bad: "#f85149", text: "#d0d0d0", dim: "#8b949e", line: "#4fc3f7", grid: "#3a3a3a" };

// Call `fn` after the existing method `name` of `obj` (prototype hooks from the public extension API).
export function chain(obj, name, fn) {
  const orig = obj[name];
  obj[name] = function (...args) {
    const r = orig?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}

// A DOM widget that is never saved in widgets_values nor sent in the prompt: it only shows things.
export function addPanel(node, name, element, height) {
  const widget = node.addDOMWidget(name, "idfusion_panel", element, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => (typeof height === "function" ? height() : height),
    getValue: () => undefined,
    setValue: () => {},
  });
  widget.serialize = false;
  return widget;
}

export function panelElement(cls) {
  const el = document.createElement("div");
  el.className = `idfusion-panel ${cls}`;
  Object.assign(el.style, {
    font: "12px monospace", color: COLORS.text, background: "rgba(0,0,0,0.25)", borderRadius: "6px",
    padding: "4px 6px", boxSizing: "border-box", overflow: "hidden", whiteSpace: "pre", lineHeight: "18px",
  });
  return el;
}

export function toast(severity, summary, detail) {
  try {
    app.extensionManager?.toast?.add({ severity, summary, detail, life: 5000 });
  } catch (e) {
    console.warn("IDFusion:", summary, detail);
  }
}

export function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

export function fmt(x, digits = 4) {
  const v = typeof x === "string" ? parseFloat(x) : x;
  if (typeof x === "string" && !Number.isFinite(v)) return x; // "inf" travels as a string (see eval_nodes.ui_scores)
  return Number.isFinite(v) ? v.toFixed(digits) : String(x);
}

// Grow a node (never shrink it) to what its widgets need once the stock image preview (added when the node is
// next drawn with its new images) is there; otherwise the frontend squeezes the panel to make room for the image.
// Call it from onExecuted; it hooks the node's draw once per node type via fitOnDraw().
export function growToFit(node) {
  node.__idfusionFit = true;
  node.setDirtyCanvas?.(true, true);
}

export function fitOnDraw(nodeType) {
  chain(nodeType.prototype, "onDrawForeground", function () {
    if (!this.__idfusionFit || !this.widgets?.some((w) => w.name === "$$canvas-image-preview")) return;
    this.__idfusionFit = false;
    const [w, h] = this.computeSize();
    if (w > this.size[0] || h > this.size[1]) {
      this.setSize([Math.max(this.size[0], w), Math.max(this.size[1], h)]);
      this.setDirtyCanvas?.(true, true);
    }
  });
}
