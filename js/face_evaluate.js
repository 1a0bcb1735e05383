// Face Evaluate: a badge on the node after a run with each image's identity similarity, distance and whether a
// face was found, then (where the server measured them) Sim(GT), copy-paste M_CP, leakage, ID-Conf and which
// reference each face matched, from the node's ui output idfusion_scores (one entry per image, see
// nodes/eval_nodes.py). Nothing is computed here.
import { app } from "../../scripts/app.js";
import { COLORS, addPanel, chain, fitOnDraw, fmt, growToFit, panelElement } from "./idfusion_common.js";

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
  const line = (text, extra) => {
    const div = document.createElement("div");
    div.className = extra ? "idfusion-score-extra" : "idfusion-score-row";
    Object.assign(div.style, { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis", height: "20px", lineHeight: "20px" });
    if (extra) Object.assign(div.style, { paddingLeft: "14px", color: COLORS.dim });
    if (text) div.append(text);
    return div;
  };
  const found = scores.filter((s) => s.found).length;
  const mean = (k) => scores.reduce((a, s) => a + (Number.isFinite(+s[k]) ? +s[k] : 0), 0) / scores.length;
  const rows = scores.length > 1
    ? [{ label: `mean of ${scores.length}`, similarity: scores[0].similarity === "nan" ? "nan" : mean("similarity"), distance: mean("distance"),
         ssim: mean("ssim"), psnr: mean("psnr"), found: found === scores.length, face: `${found}/${scores.length}` }]
    : [];
  scores.forEach((s, i) => rows.push({ label: scores.length > 1 ? `image ${i}` : "", ...s, face: s.found ? "found" : "none" }));
  for (const r of rows) {
    const row = line("", false);
    const chip = document.createElement("span");
    chip.className = "idfusion-face-chip";
    chip.textContent = r.found ? `\u2714 face ${r.face}` : `\u2718 face ${r.face}`;
    Object.assign(chip.style, { background: r.found ? COLORS.ok : COLORS.bad, color: "#000", borderRadius: "4px", padding: "1px 5px", marginRight: "6px" });
    // "nan": the face model has no ArcFace (Haar), so only faces, SSIM and PSNR were measured
    const identity = r.similarity === "nan"
      ? `no identity model: ssim ${fmt(r.ssim, 3)}  psnr ${fmt(r.psnr, 1)}`
      : `similarity ${fmt(r.similarity, 3)}  distance ${fmt(r.distance, 3)}`;
    row.append(chip, `${r.label ? r.label + ": " : ""}${identity}`);
    el.append(row);
    const extras = [];
    if (r.sim_gt != null) extras.push(`Sim(GT) ${fmt(r.sim_gt, 3)}  copy-paste ${r.copy_paste == null ? "-" : fmt(r.copy_paste, 3)}`);
    if (r.leakage != null || r.id_conf != null) extras.push(`leakage ${r.leakage == null ? "-" : fmt(r.leakage, 3)}  ID-Conf ${r.id_conf == null ? "-" : fmt(r.id_conf, 3)}`);
    if (r.faces?.length > 1) extras.push(`faces: ${r.faces.map((f) => (f.match == null ? "unmatched" : `ref ${f.match + 1}`)).join(", ")}`);
    if (extras.length) el.append(line(extras.join("   "), true));
  }
  el.dataset.state = found === scores.length ? "found" : "missing";
  el.dataset.similarity = String(scores[0].similarity);
  el.dataset.distance = String(scores[0].distance);
  el.dataset.found = String(!!scores[0].found);
  el.dataset.copyPaste = String(scores[0].copy_paste ?? "");
}

app.registerExtension({
  name: "IDFusion.faceEvaluate",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    fitOnDraw(nodeType);
    chain(nodeType.prototype, "onNodeCreated", function () {
      this.__idfusionBadge = panelElement("idfusion-score-badge");
      // content: 20px per row + 8px padding; the frontend (1.32) lays a DOM widget out 12px shorter than its min height
      addPanel(this, "idfusion_scores_badge", this.__idfusionBadge, () => 20 + 20 * Math.max(1, this.__idfusionBadge.childElementCount));
      render(this, null);
    });
    chain(nodeType.prototype, "onExecuted", function (output) {
      if (!Array.isArray(output?.idfusion_scores)) return;
      render(this, output.idfusion_scores);
      // room for one line per image: chip, similarity, distance
      this.setSize([Math.max(this.size[0], 420), Math.max(this.size[1], this.computeSize()[1])]);
      // with a ground truth the node also previews its copy-paste chart (ui images): make room once it is drawn
      if (output.images?.length) growToFit(this);
      this.setDirtyCanvas?.(true, true);
    });
  },
});
