// Face Evaluate: a badge on the node after a run with each image's identity similarity, distance and whether a
// face was found, from the node's ui output idfusion_scores (one entry per image, see nodes/eval_nodes.py).
import { app } from "../../scripts/app.js";
import { COLORS, addPanel, chain, fmt, panelElement } from "./idfusion_common.js";

const NODE = "IDFusionFaceEvaluate";

function render(node, scores) {
  const el = node.__idfusionBadge;
  if (!el) return;
  el.replaceChildren();
  if (!scores?.length) {
    el.textContent = "scores: after a run";
    el.style.color = COLORS.dim;
    el.dataset.state = "empty";
    return;
  }
  el.style.color = COLORS.text;
  const found = scores.filter((s) => s.found).length;
  const mean = (k) => scores.reduce((a, s) => a + (Number.isFinite(+s[k]) ? +s[k] : 0), 0) / scores.length;
  const rows = scores.length > 1
    ? [{ label: `mean of ${scores.length}`, similarity: mean("similarity"), distance: mean("distance"), found: found === scores.length, face: `${found}/${scores.length}` }]
    : [];
  scores.forEach((s, i) => rows.push({ label: scores.length > 1 ? `image ${i}` : "", ...s, face: s.found ? "found" : "none" }));
  for (const r of rows) {
    const line = document.createElement("div");
    line.className = "idfusion-score-row";
    Object.assign(line.style, { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis", height: "20px", lineHeight: "20px" });
    const chip = document.createElement("span");
    chip.className = "idfusion-face-chip";
    chip.textContent = r.found ? `\u2714 face ${r.face}` : `\u2718 face ${r.face}`;
    Object.assign(chip.style, { background: r.found ? COLORS.ok : COLORS.bad, color: "#000", borderRadius: "4px", padding: "1px 5px", marginRight: "6px" });
    line.append(chip, `${r.label ? r.label + ": " : ""}similarity ${fmt(r.similarity, 3)}  distance ${fmt(r.distance, 3)}`);
    el.append(line);
  }
  el.dataset.state = found === scores.length ? "found" : "missing";
  el.dataset.similarity = String(scores[0].similarity);
  el.dataset.distance = String(scores[0].distance);
  el.dataset.found = String(!!scores[0].found);
}

app.registerExtension({
  name: "IDFusion.faceEvaluate",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      this.__idfusionBadge = panelElement("idfusion-score-badge");
      addPanel(this, "idfusion_scores_badge", this.__idfusionBadge, () => 18 + 20 * Math.max(1, this.__idfusionBadge.childElementCount));
      render(this, null);
    });
    chain(nodeType.prototype, "onExecuted", function (output) {
      if (!Array.isArray(output?.idfusion_scores)) return;
      render(this, output.idfusion_scores);
      // room for one line per image: chip, similarity, distance
      this.setSize([Math.max(this.size[0], 420), Math.max(this.size[1], this.computeSize()[1])]);
      this.setDirtyCanvas?.(true, true);
    });
  },
});
