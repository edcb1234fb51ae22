/* Charts (uPlot, served by the hub: static/vendor/) and the subscribers' sparklines.
 *
 * Three charts over a range of 1 h, 6 h or 24 h: deliveries and failed attempts, one line per
 * subscriber in its own colour (the same colour in every view: dom.js colourOf), and the
 * backlog age. One uPlot instance each, fed with setData, so refreshes do not flicker. The
 * legend shows the values under the cursor, and the last values when the cursor is off.
 */

import { $, colourKey, colourOf, fmtAge, fmtInt, h, pad, setAttr, setText, zone } from './dom.js';

/** minutes: asked of GET /api/stats; step: minutes per point; label: what a point counts. */
export const RANGES = {
  '1h': { minutes: 60, step: 1, label: 'per minute', name: 'last hour' },
  '6h': { minutes: 360, step: 5, label: 'per 5 min', name: 'last 6 hours' },
  '24h': { minutes: 1440, step: 15, label: 'per 15 min', name: 'last 24 hours' },
};
const HEIGHT = 200;
const COUNT_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];
// Backlog ticks land on whole seconds, minutes or hours, and say which.
const AGE_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 86400];
const ageTick = (v) => (v >= 3600 ? v / 3600 + ' h' : v >= 60 ? v / 60 + ' m' : v + ' s');
const hhmm = (t) => { const d = new Date(t * 1000); return pad(d.getHours()) + ':' + pad(d.getMinutes()); };

const charts = { deliveries: null, failures: null, backlog: null, key: '' };
const CHART_IDS = { deliveries: '#chart-deliveries', failures: '#chart-failures', backlog: '#chart-backlog' };

/** Sum (or take the largest of) every `step` minutes, the last point ending now. */
export function bucket(t, values, step, agg = 'sum') {
  if (step <= 1) return [t, values];
  const outT = [];
  const outV = [];
  for (let end = t.length; end > 0; end -= step) {
    const start = Math.max(0, end - step);
    const part = values.slice(start, end);
    outT.unshift(t[start]);
    outV.unshift(agg === 'max' ? Math.max(0, ...part) : part.reduce((a, b) => a + (b || 0), 0));
  }
  return [outT, outV];
}

const chartWidth = (el) => Math.max(300, el.clientWidth - 8);

/** The legend's values at the last point whenever the cursor is not over the chart. */
function lastWhenOff(u) {
  if (u.cursor.idx === null || u.cursor.idx === undefined) {
    const n = u.data[0] ? u.data[0].length : 0;
    if (n) u.setLegend({ idx: n - 1 }, false);
  }
}

function baseOpts(el, yLabel, series, yAxis = {}) {
  const axis = { stroke: '#656d76', font: '11px system-ui, sans-serif', labelFont: '11px system-ui, sans-serif',
    grid: { stroke: '#eceef1', width: 1 }, ticks: { stroke: '#dde1e6', width: 1, size: 4 } };
  return {
    width: chartWidth(el), height: HEIGHT,
    cursor: { y: false, drag: { x: false, y: false } },   // no zoom: the next refresh would reset it
    legend: { markers: { width: 0, fill: (u, i) => series[i - 1] && series[i - 1].stroke } },
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max * 1.1, 5)] } },
    axes: [{ ...axis, values: (u, splits) => splits.map(hhmm), label: 'time (' + zone() + ')', labelSize: 14 },
      { ...axis, label: yLabel, labelSize: 16, size: 48, ...yAxis }],
    series: [{ label: 'time', value: (u, v) => (v === null ? '—' : hhmm(v) + ' ' + zone()) }, ...series],
    hooks: { setCursor: [lastWhenOff], setData: [lastWhenOff], ready: [lastWhenOff] },
  };
}

/** Draw (or update) the three charts from GET /api/stats for `range` (a RANGES key). */
export function renderStats(st, range) {
  if (typeof uPlot === 'undefined') return;
  const r = RANGES[range] || RANGES['1h'];
  const names = Object.keys(st.subscribers || {}).sort();
  const t0 = st.t || [];
  const per = (field) => names.map((n) => bucket(t0, st.subscribers[n][field] || [], r.step)[1]);
  const [t] = bucket(t0, st.accepted || [], r.step);
  const delivered = [t, ...per('delivered')];
  const failed = [t, ...per('failed')];
  const backlog = bucket(t0, st.backlogAgeSeconds || [], r.step, 'max');
  const els = Object.fromEntries(Object.entries(CHART_IDS).map(([k, id]) => [k, $(id)]));
  if (els.deliveries.clientWidth === 0) return;   // hidden: drawn by the next poll

  const key = names.join('\n') + '|' + range + '|' + colourKey();
  if (charts.key !== key) {
    // The subscriber set or the range changed: the series or the axis labels change.
    for (const k of Object.keys(CHART_IDS)) if (charts[k]) { charts[k].destroy(); charts[k] = null; }
    const lines = (dash) => names.map((n) => ({ label: n, stroke: colourOf(n), width: 1.5, dash, value: (u, v) => fmtInt(v) }));
    charts.deliveries = new uPlot(baseOpts(els.deliveries, r.label, lines(undefined), { incrs: COUNT_INCRS }), delivered, els.deliveries);
    charts.failures = new uPlot(baseOpts(els.failures, r.label, lines(undefined), { incrs: COUNT_INCRS }), failed, els.failures);
    charts.backlog = new uPlot(baseOpts(els.backlog, 'age', [{
      label: 'oldest backlog', stroke: '#57606a', width: 1.5, fill: 'rgba(87,96,106,0.08)',
      value: (u, v) => (v === null ? '—' : fmtAge(v)),
    }], { incrs: AGE_INCRS, values: (u, splits) => splits.map(ageTick) }), backlog, els.backlog);
    charts.key = key;
  } else {
    charts.deliveries.setData(delivered);
    charts.failures.setData(failed);
    charts.backlog.setData(backlog);
  }
  const none = (arr) => !arr || arr.every((v) => !v);
  chartMessage(els.deliveries, !delivered.slice(1).every(none) ? null : none(st.accepted)
    ? [`No events in the ${r.name}. Send one with `, h('code', {}, 'relay send FILE'), '.']
    : [`No delivery in the ${r.name}.`]);
  chartMessage(els.failures, failed.slice(1).every(none) ? [`No failed attempt in the ${r.name}.`] : null);
  chartMessage(els.backlog, null);
}

/** A line over the chart (faded behind it) for "nothing to show" and "could not load". */
function chartMessage(el, parts) {
  const msg = $('.chart-empty', el);
  const text = parts ? parts.map((p) => (p instanceof Node ? p.textContent : p)).join('') : '';
  if (msg.textContent !== text) msg.replaceChildren(...(parts || []));
  msg.hidden = !parts;
}

export function statsError(e) {
  if (charts.deliveries) return;   // keep the last lines; the header says the API failed
  for (const id of Object.values(CHART_IDS)) chartMessage($(id), ['No chart data: ' + e.message]);
}

export function initChartResize() {
  // Keep each chart as wide as its card (the grid reflows with the window).
  const ro = new ResizeObserver(() => {
    for (const [k, id] of Object.entries(CHART_IDS)) {
      const el = $(id);
      const chart = charts[k];
      if (chart && el.clientWidth && chart.width !== chartWidth(el)) chart.setSize({ width: chartWidth(el), height: HEIGHT });
    }
  });
  for (const id of Object.values(CHART_IDS)) ro.observe($(id));
}

// ---- sparklines (inline SVG: sixty points per row do not need a chart each) ---------------

// A fixed template (no API data in it): area under the line, the line, failure ticks, tooltip.
const SPARK = '<svg class="spark" viewBox="0 0 120 24" preserveAspectRatio="none">'
  + '<path class="a"/><path class="d"/><path class="f"/><title></title></svg>';
export function makeSpark() {
  const t = document.createElement('template');
  t.innerHTML = SPARK;
  return t.content.firstChild;
}

export function updateSpark(svg, name, delivered, failed) {
  const n = delivered.length;
  const max = Math.max(1, ...delivered, ...failed);
  const x = (i) => (n > 1 ? (i * 120) / (n - 1) : 60).toFixed(1);
  const y = (v) => (23 - (v / max) * 21).toFixed(1);
  const line = delivered.map((v, i) => (i ? 'L' : 'M') + x(i) + ' ' + y(v)).join('');
  const [area, dline, fails, title] = svg.children;
  setAttr(area, 'd', n ? line + 'L120 24L0 24Z' : '');
  setAttr(dline, 'd', line);
  if (dline.style.stroke !== colourOf(name)) dline.style.stroke = colourOf(name);
  setAttr(fails, 'd', failed.map((v, i) => (v ? `M${x(i)} 24V${y(v)}` : '')).join(''));
  const sum = (a) => a.reduce((p, q) => p + q, 0);
  setText(title, `last hour: ${fmtInt(sum(delivered))} delivered, ${fmtInt(sum(failed))} failed attempts`);
}
