/* The overview page (#/, #/?range=6h): the subscribers table and the charts. */

import { api, query, seg } from './api.js';
import { RANGES, initChartResize, makeSpark, renderStats, statsError, updateSpark } from './charts.js';
import { renderOrdering } from './ordering.js';
import { $, dot, fmtAge, fmtClock, fmtDateTime, fmtInt, fmtMs, fmtPct, h, setAttr, setSubscriberNames, setText, toast } from './dom.js';

const STATE_RANK = { open: 0, 'half-open': 1, disabled: 2, paused: 3, active: 4 };
export const hub = { subscribers: [], stats: null, range: '1h', failing: new Set() };
const rows = new Map();   // name → {tr, c}; rows are updated in place, never rebuilt

export function rangeOf(params) {
  const r = params.get('range');
  return RANGES[r] ? r : '1h';
}

export function initOverview() {
  initChartResize();
  for (const btn of document.querySelectorAll('[data-testid="chart-range"] button')) {
    btn.addEventListener('click', () => {
      location.hash = '#/' + query({ range: btn.dataset.range === '1h' ? '' : btn.dataset.range });
    });
  }
}

/** What one poll of the overview fetches and draws. */
export function refreshOverview(params) {
  hub.range = rangeOf(params);
  syncRange();
  const r = RANGES[hub.range];
  const subs = api('subscribers').then((list) => { renderSubscribers(list); return renderOrdering(list); },
    subscribersError);
  // The charts after the table: each subscriber's colour follows from the list of them.
  const stats = Promise.all([api('stats' + query({ minutes: r.minutes })), subs]).then(([st]) => {
    hub.stats = st;
    renderStats(st, hub.range);
    renderSparks(st);
  }, statsError);
  return [subs, stats];
}

function syncRange() {
  for (const btn of document.querySelectorAll('[data-testid="chart-range"] button')) {
    setAttr(btn, 'aria-pressed', String(btn.dataset.range === hub.range));
  }
  const r = RANGES[hub.range];
  for (const el of document.querySelectorAll('.chart-range-name')) setText(el, r.name + ' · ' + r.label);
}

function sortSubscribers(list) {
  // The API sends unhealthy first; the state rank makes that explicit, its order breaks ties.
  const rank = (s) => (s.configured === false ? 9 : STATE_RANK[s.state] ?? 5);
  return list.map((s, i) => [s, i]).sort((a, b) => rank(a[0]) - rank(b[0]) || a[1] - b[1]).map((x) => x[0]);
}

function makeRow(name) {
  const c = {
    name: h('td', { class: 'c-name' }),
    state: h('td', { class: 'c-state' }, h('span', { class: 'badge', testid: 'state-badge' })),
    success: h('td', { class: 'num' }), p50: h('td', { class: 'num' }), p99: h('td', { class: 'num' }),
    pending: h('td', { class: 'num' }), oldest: h('td', { class: 'num' }), dead: h('td', { class: 'num' }),
    error: h('td', { class: 'c-error' }), spark: h('td', { class: 'c-spark' }, makeSpark()),
    action: h('td', { class: 'c-action' }),
  };
  const tr = h('tr', { testid: 'subscriber-row', dataset: { name } }, Object.values(c));
  return { tr, c };
}

export function renderSubscribers(list) {
  hub.subscribers = list;
  setSubscriberNames(list.map((s) => s.name));
  const body = $('#subs-body');
  if (!list.length) {
    rows.clear();
    body.replaceChildren(h('tr', { class: 'empty' }, h('td', { colspan: 11 },
      'No subscribers configured. Add one under ', h('code', {}, 'subscribers:'), ' in the config file and restart; ',
      h('code', {}, 'relay check-config'), ' lists them.')));
    return;
  }
  const seen = new Set();
  sortSubscribers(list).forEach((s, i) => {
    seen.add(s.name);
    let row = rows.get(s.name);
    if (!row) { row = makeRow(s.name); rows.set(s.name, row); }
    updateRow(row, s);
    if (body.children[i] !== row.tr) body.insertBefore(row.tr, body.children[i] || null);
  });
  for (const [name, row] of rows) if (!seen.has(name)) { row.tr.remove(); rows.delete(name); }
  for (const el of [...body.children]) if (!el.dataset.name) el.remove();   // the loading/empty row
  if (hub.stats) renderSparks(hub.stats);   // new rows get their sparkline without waiting a poll
}

function subscribersError(e) {
  if (rows.size) return;
  $('#subs-body').replaceChildren(h('tr', { class: 'empty' }, h('td', { colspan: 11 }, 'Could not load subscribers: ' + e.message)));
}

function updateRow({ tr, c }, s) {
  const removed = s.configured === false;
  setAttr(tr, 'data-state', s.state);
  tr.classList.toggle('failing', hub.failing.has(s.name));
  if (!c.name.firstChild) c.name.append(dot(s.name), h('span'), h('span', { class: 'removed' }));
  setText(c.name.children[1], s.name);
  setText(c.name.children[2], removed ? 'removed' : '');
  setAttr(c.name, 'title', [s.url, s.signature && `signature: ${s.signature}`, s.rateLimit && `rate limit ${s.rateLimit}`,
    s.lastSuccessAt && `last success ${fmtDateTime(s.lastSuccessAt)}`].filter(Boolean).join('\n'));

  const badge = c.state.firstChild;
  const state = removed ? 'removed' : s.state;
  setText(badge, state);
  setAttr(badge, 'class', 'badge s-' + state);
  setAttr(badge, 'title', breakerTitle(s));

  setText(c.success, fmtPct(s.successRate));
  const rate = s.successRate;
  setAttr(c.success, 'class', 'num' + (rate === null ? ' zero' : rate < 0.9 ? ' bad' : rate < 0.99 ? ' warn' : ''));
  setText(c.p50, fmtMs(s.latencyP50Ms));
  setText(c.p99, fmtMs(s.latencyP99Ms));
  setText(c.pending, fmtInt(s.pending));
  setAttr(c.pending, 'class', 'num' + (s.pending ? '' : ' zero'));
  setText(c.oldest, fmtAge(s.oldestPendingSeconds));
  setAttr(c.oldest, 'class', 'num' + (s.oldestPendingSeconds === null ? ' zero' : s.oldestPendingSeconds > 60 ? ' warn' : ''));
  updateDeadCell(c.dead, s);

  setText(c.error, s.lastError || '—');
  setAttr(c.error, 'class', 'c-error' + (s.lastError ? ' has' : ''));
  setAttr(c.error, 'title', s.lastError ? `${s.lastError}\n${fmtDateTime(s.lastErrorAt)}` : null);
  updateAction(c.action, s);
}

function breakerTitle(s) {
  const b = s.breaker || {};
  if (s.state === 'open' && b.openUntil) return `circuit open until ${fmtClock(b.openUntil)} after ${b.failures} failures`;
  if (s.state === 'half-open') return 'circuit half-open: trying one delivery';
  if (s.state === 'paused') return 'paused: deliveries wait until resumed';
  return null;
}

function updateDeadCell(td, s) {
  const href = '#/dlq' + query({ subscriber: s.name });
  let a = td.firstChild;
  if (!a) { a = h('a'); td.append(a); }
  setText(a, fmtInt(s.deadLetters));
  setAttr(a, 'href', href);
  setAttr(a, 'class', s.deadLetters ? 'bad' : 'zero');
  setAttr(td, 'class', 'num' + (s.deadLetters ? '' : ' zero'));
}

function updateAction(td, s) {
  // Pause for a flowing subscriber; resume for a paused one, or a disabled one (resume
  // re-enables it); nothing for a removed one.
  const kind = s.configured === false ? null
    : (s.state === 'paused' || s.state === 'disabled') ? 'resume' : 'pause';
  const btn = td.firstChild;
  if (btn && btn.dataset.kind === kind && !btn.disabled) return;
  if (!kind) { td.replaceChildren(); return; }
  td.replaceChildren(h('button', {
    type: 'button', class: 'btn small', testid: kind + '-button', dataset: { kind },
    title: kind === 'pause' ? `Stop delivering to ${s.name}; events wait as pending` : `Deliver to ${s.name} again`,
    onclick: (e) => togglePause(e.currentTarget, s.name, kind),
  }, kind === 'pause' ? 'Pause' : 'Resume'));
}

async function togglePause(btn, name, kind) {
  btn.disabled = true;
  try {
    const s = await api(`subscribers/${seg(name)}/${kind}`, { method: 'POST' });
    const i = hub.subscribers.findIndex((x) => x.name === name);
    if (i >= 0) hub.subscribers[i] = s;
    renderSubscribers(hub.subscribers);
    toast(`${name} ${kind === 'pause' ? 'paused' : 'resumed'}`);
  } catch (e) {
    btn.disabled = false;
    toast(`Could not ${kind} ${name}: ${e.message}`, true);
  }
}

function renderSparks(st) {
  for (const [name, row] of rows) {
    const s = (st.subscribers || {})[name];
    updateSpark(row.c.spark.firstChild, name, s ? s.delivered.slice(-60) : [], s ? s.failed.slice(-60) : []);
  }
}
