// A small SVG line chart (no library): rounded axis ticks, one line per series, dots with a
// tooltip where a series has few points, and a legend.
const SVG = "http://www.w3.org/2000/svg";
const MARGIN = { top: 28, right: 18, bottom: 34, left: 58 };
const TICKS = 5;

function svgElement(tag, attributes = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) el.setAttribute(name, value);
  if (text !== undefined) el.textContent = text;
  return el;
}

/** A [lo, hi] that contains min..max and starts and ends on a round step, and that step. */
function niceScale(min, max) {
  if (min === max) {
    const pad = Math.abs(min) * 0.1 || 1;
    [min, max] = [min - pad, max + pad];
  }
  const raw = (max - min) / TICKS;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * magnitude).find((s) => s >= raw);
  const lo = Math.floor(min / step) * step;
  const hi = Math.ceil(max / step) * step;
  const ticks = [];
  for (let i = 0; lo + i * step <= hi + step / 1e6; i++) ticks.push(Number((lo + i * step).toPrecision(12)));
  return { lo, hi, ticks };
}

/**
 * Draw `series` ([{name, className, points: [[x, y], ...], dots}]) into `svg` (its viewBox sets
 * the size). `yRange` fixes the y axis (e.g. [0, 1]). Returns whether there was anything to draw.
 */
export function drawLineChart(svg, series, { yRange, yFormat = String, xLabel = "step" } = {}) {
  svg.replaceChildren();
  const points = series.flatMap((s) => s.points);
  if (!points.length) return false;
  const { width, height } = svg.viewBox.baseVal;
  const plot = { x0: MARGIN.left, x1: width - MARGIN.right, y0: height - MARGIN.bottom, y1: MARGIN.top };
  const xs = niceScale(Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0])));
  const ys = yRange ? { lo: yRange[0], hi: yRange[1], ticks: niceScale(...yRange).ticks }
                    : niceScale(Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1])));
  const sx = (x) => plot.x0 + ((x - xs.lo) / (xs.hi - xs.lo)) * (plot.x1 - plot.x0);
  const sy = (y) => plot.y0 - ((y - ys.lo) / (ys.hi - ys.lo)) * (plot.y0 - plot.y1);

  const axes = svgElement("g", { class: "chart-axes" });
  for (const tick of ys.ticks) {
    axes.append(svgElement("line", { x1: plot.x0, x2: plot.x1, y1: sy(tick), y2: sy(tick), class: "chart-grid" }));
    axes.append(svgElement("text", { x: plot.x0 - 8, y: sy(tick), "text-anchor": "end", "dominant-baseline": "middle" }, yFormat(tick)));
  }
  for (const tick of xs.ticks) {
    axes.append(svgElement("text", { x: sx(tick), y: plot.y0 + 18, "text-anchor": "middle" }, tick.toLocaleString("en-US")));
  }
  axes.append(svgElement("line", { x1: plot.x0, x2: plot.x1, y1: plot.y0, y2: plot.y0, class: "chart-axis" }));
  axes.append(svgElement("text", { x: plot.x1, y: height - 4, "text-anchor": "end", class: "chart-label" }, xLabel));
  svg.append(axes);

  let legendX = plot.x0;
  for (const s of series) {
    if (!s.points.length) continue;
    const group = svgElement("g", { class: `chart-series ${s.className}` });
    group.append(svgElement("polyline", { points: s.points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" ") }));
    if (s.dots) {
      for (const [x, y] of s.points) {
        const dot = svgElement("circle", { cx: sx(x), cy: sy(y), r: 3.5 });
        dot.append(svgElement("title", {}, `${s.name} at step ${x}: ${yFormat(y)}`));
        group.append(dot);
      }
    }
    group.append(svgElement("line", { x1: legendX, x2: legendX + 18, y1: 10, y2: 10, class: "chart-key" }));
    const label = svgElement("text", { x: legendX + 24, y: 10, "dominant-baseline": "middle", class: "chart-legend" }, s.name);
    group.append(label);
    svg.append(group);
    legendX += 24 + label.getComputedTextLength() + 20;
  }
  return true;
}
