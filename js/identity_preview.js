// Encode Reference Face / Load Identity: the server returns the identity's reference thumbnails as ui images
// (the stock frontend draws them on the node); this adds a caption saying whose references they are.
import { app } from "../../scripts/app.js";
import { addPanel, chain, fitOnDraw, growToFit, panelElement, widget } from "./idfusion_common.js";

const NODES = { IDFusionEncodeReference: "name", IDFusionLoadIdentity: "identity_name" };

function caption(node, output) {
  const el = node.__idfusionCaption;
  if (!el) return;
  const n = output?.images?.length ?? 0;
  const who = output?.idfusion_identity?.[0]?.name ?? widget(node, NODES[node.comfyClass])?.value ?? "identity";
  const refs = output?.idfusion_identity?.[0]?.references ?? n;
  el.textContent = n ? `${who}: ${refs} reference${refs === 1 ? "" : "s"} (thumbnails below)` : "reference thumbnails: after a run";
  el.dataset.state = n ? "shown" : "empty";
  el.dataset.references = String(refs);
}

app.registerExtension({
  name: "IDFusion.identityPreview",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!(nodeData.name in NODES)) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      this.__idfusionCaption = panelElement("idfusion-identity-caption");
      addPanel(this, "idfusion_identity_caption", this.__idfusionCaption, 40);  // one line + the widget margin
      caption(this, null);
    });
    fitOnDraw(nodeType);
    chain(nodeType.prototype, "onExecuted", function (output) {
      caption(this, output);
      growToFit(this);
    });
  },
});
