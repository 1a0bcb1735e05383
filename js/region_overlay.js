// Apply Multi-Identity / Face Masks: the server returns a picture with each identity's region in its own colour
// as ui images (drawn on the node by the stock frontend); this adds the legend, colour -> identity, from the
// node's ui output idfusion_regions ([{label, color}, ...]) when the server sends it.
import { app } from "../../scripts/app.js";
import { addPanel, chain, fitOnDraw, growToFit, panelElement } from "./idfusion_common.js";

const NODES = new Set(["IDFusionApplyMultiIdentity", "IDFusionFaceMasks"]);

function legend(node, output) {
  const el = node.__idfusionLegend;
  if (!el) return;
  el.replaceChildren();
  const regions = Array.isArray(output?.idfusion_regions) ? output.idfusion_regions : null;
  if (!output?.images?.length && !regions) {
    el.textContent = "identity regions: after a run";
    el.dataset.state = "empty";
    return;
  }
  if (!regions) {
    el.textContent = "regions: one colour per identity (below)";
    el.dataset.state = "shown";
    return;
  }
  regions.forEach((r, i) => {
    const item = document.createElement("span");
    item.className = "idfusion-region";
    const sw = document.createElement("span");
    Object.assign(sw.style, { display: "inline-block", width: "10px", height: "10px", background: r.color, marginRight: "4px", borderRadius: "2px" });
    item.append(sw, `${r.label ?? "identity " + (i + 1)}  `);
    el.append(item);
  });
  el.dataset.state = "shown";
  el.dataset.regions = String(regions.length);
}

app.registerExtension({
  name: "IDFusion.regionOverlay",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      this.__idfusionLegend = panelElement("idfusion-region-legend");
      addPanel(this, "idfusion_region_legend", this.__idfusionLegend, 40);  // one line + the widget margin
      legend(this, null);
    });
    fitOnDraw(nodeType);
    chain(nodeType.prototype, "onExecuted", function (output) {
      legend(this, output);
      growToFit(this);
    });
  },
});
