// Train Adapter: a live loss chart inside the node, fed by the server's "idfusion.train" messages
// ({node, step, steps, loss}, one per step) and replaced by the node's final ui output idfusion_loss
// ([[step, loss], ...]). The points are kept in node.properties, so the chart survives the run and a reload.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { COLORS, addPanel, chain } from "./idfusion_common.js";

const NODE = "IDFusionTrainAdapter";
const MAX_POINTS = 2000; // thinned evenly beyond this, so saved workflows stay small
const LOG_SETTING = "IDFusion.TrainChart.LogScale";

function thin(points) {
  if (points.length <= MAX_POINTS) return points;
  const out = [];
  const stride = points.length / MAX_POINTS;
  for (let i = 0; i < MAX_POINTS; i++) out.push(points[Math.floor(i * stride)]);
  out[out.length - 1] = points[points.length - 1];
  return out;
}

function draw(node) {
  const chart = node.__idfusionChart;
  if (!chart) return;
  const { canvas, label } = chart;
  const points = node.properties.idfusion_loss || [];
  const steps = node.properties.idfusion_steps || (points.length ? points[points.length - 1][0] : 0);
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(50, canvas.clientWidth), h = Math.max(40, canvas.clientHeight);
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(0, 0, w, h);
  ctx.strokeStyle = COLORS.grid;
  ctx.lineWidth = 1;
  for (let i = 1; i < 4; i++) {
    const y = Math.round((h * i) / 4) + 0.5;
    ctx.beginPath(); ctx.moveTo(0, y); ctx.lineTo(w, y); ctx.stroke();
  }
  chart.root.dataset.points = String(points.length);
  if (!points.length) {
    label.textContent = "loss: appears here while the node trains";
    return;
  }
  const log = !!app.extensionManager?.setting?.get(LOG_SETTING);
  const ys = points.map(([, l]) => (log ? Math.log10(Math.max(l, 1e-12)) : l));
  let lo = Math.min(...ys), hi = Math.max(...ys);
  if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
  const x0 = points[0][0], x1 = Math.max(steps, points[points.length - 1][0], x0 + 1);
  const pad = 4;
  const px = (s) => pad + ((s - x0) / (x1 - x0)) * (w - 2 * pad);
  const py = (y) => h - pad - ((y - lo) / (hi - lo)) * (h - 2 * pad);
  ctx.strokeStyle = COLORS.line;
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach(([s], i) => (i ? ctx.lineTo(px(s), py(ys[i])) : ctx.moveTo(px(s), py(ys[i]))));
  if (points.length === 1) ctx.lineTo(px(points[0][0]) + 2, py(ys[0]));
  ctx.stroke();
  const [s, l] = points[points.length - 1];
  label.textContent = `step ${s}${steps ? "/" + steps : ""}  loss ${l.toFixed(4)}  (min ${Math.min(...points.map((p) => p[1])).toFixed(4)}${log ? ", log scale" : ""})`;
  chart.root.dataset.lastStep = String(s);
  chart.root.dataset.lastLoss = String(l);
}

function setPoints(node, points, steps) {
  node.properties.idfusion_loss = thin(points.map(([s, l]) => [Number(s), Number(l)]));
  if (steps) node.properties.idfusion_steps = Number(steps);
  draw(node);
  node.setDirtyCanvas?.(true, false);
}

app.registerExtension({
  name: "IDFusion.trainChart",
  settings: [
    { id: LOG_SETTING, name: "IDFusion: loss chart on a log scale", type: "boolean", defaultValue: false,
      tooltip: "Draw the Train Adapter loss chart with a logarithmic y axis.", onChange: () => app.graph?._nodes?.forEach(draw) },
  ],
  setup() {
    api.addEventListener("idfusion.train", ({ detail }) => {
      const node = app.graph?.getNodeById(detail?.node);
      if (!node || node.comfyClass !== NODE) return;
      const step = Number(detail.step), loss = Number(detail.loss);
      if (!Number.isFinite(step) || !Number.isFinite(loss)) return;
      // a new run (or a resumed one) replaces what lies at or after its first step
      const kept = (node.properties.idfusion_loss || []).filter(([s]) => s < step);
      setPoints(node, [...kept, [step, loss]], detail.steps);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      const root = document.createElement("div");
      root.className = "idfusion-loss-chart";
      Object.assign(root.style, { display: "flex", flexDirection: "column", gap: "2px", width: "100%", height: "100%" });
      const canvas = document.createElement("canvas");
      Object.assign(canvas.style, { width: "100%", flex: "1 1 auto", minHeight: "80px", borderRadius: "4px" });
      const label = document.createElement("div");
      Object.assign(label.style, { font: "11px monospace", color: COLORS.text, whiteSpace: "nowrap", overflow: "hidden" });
      root.append(canvas, label);
      this.__idfusionChart = { root, canvas, label };
      this.properties ??= {};
      addPanel(this, "idfusion_loss_chart", root, 140);
      new ResizeObserver(() => draw(this)).observe(canvas);
      requestAnimationFrame(() => draw(this));
    });
    chain(nodeType.prototype, "onConfigure", function () {
      requestAnimationFrame(() => draw(this));
    });
    chain(nodeType.prototype, "onExecuted", function (output) {
      if (Array.isArray(output?.idfusion_loss)) setPoints(this, output.idfusion_loss);
    });
  },
});
