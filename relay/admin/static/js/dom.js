/* DOM helpers, formatting and subscriber colours, shared by every page.
 *
 * Every string from the API reaches the page through textContent or attributes (h() below),
 * never through innerHTML; styles are set through the CSSOM only (el.style.x = ...), so the
 * console runs under Content-Security-Policy: default-src 'self'.
 */

export const $ = (sel, root = document) => root.querySelector(sel);

/** h('td', {class: 'num', title: x, dataset: {a: 'b'}, testid: 'y'}, 'text', child): text only. */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'testid') el.dataset.testid = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Writing only what changed keeps refreshes from touching the layout (and from resetting
// text selection or an open tooltip).
export function setText(el, s) { s = String(s); if (el.textContent !== s) el.textContent = s; }
export function setAttr(el, k, v) {
  if (v === null || v === undefined) { if (el.hasAttribute(k)) el.removeAttribute(k); }
  else if (el.getAttribute(k) !== String(v)) el.setAttribute(k, v);
}

let toastTimer = 0;
export function toast(msg, bad = false) {
  const t = $('#toast');
  t.textContent = msg;
  t.className = bad ? 'toast bad' : 'toast';
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, bad ? 8000 : 4000);
}

export function showNotice(parts, bad) {
  const n = $('#notice');
  const list = (Array.isArray(parts) ? parts : [parts]).filter((p) => p !== '' && p !== null && p !== undefined);
  const text = list.map((p) => (p instanceof Node ? p.textContent : p)).join('');
  if (n.textContent !== text) n.replaceChildren(...list);
  n.classList.toggle('bad', !!bad);
  n.hidden = !text;
}

/** Copy text to the clipboard (where the page may), else select it for Ctrl+C. */
export async function copy(text, el) {
  try {
    await navigator.clipboard.writeText(text);
    toast('Copied');
  } catch (e) {
    if (el) {
      const range = document.createRange();
      range.selectNodeContents(el);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      toast('Selected: press Ctrl+C to copy');
    }
  }
}

// ---- formatting ---------------------------------------------------------------------------

const intFmt = new Intl.NumberFormat();
export const fmtInt = (n) => (n === null || n === undefined ? '—' : intFmt.format(n));
export const plural = (n, word) => `${fmtInt(n)} ${word}${n === 1 ? '' : 's'}`;
export const fmtPct = (r) => (r === null || r === undefined ? '—' : (r >= 0.9995 ? '100' : (r * 100).toFixed(1)) + ' %');
export function fmtMs(ms) {
  if (ms === null || ms === undefined) return '—';
  if (ms >= 1000) return (ms / 1000).toFixed(ms >= 10000 ? 0 : 1) + ' s';
  return (ms >= 10 ? Math.round(ms) : ms.toFixed(1)) + ' ms';
}
/** 12.5 → "13 s", 412 → "6 m 52 s", 7300 → "2 h 1 m". */
export function fmtAge(s) {
  if (s === null || s === undefined) return '—';
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' m ' + (s % 60) + ' s';
  if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' m';
  return Math.floor(s / 86400) + ' d ' + Math.floor((s % 86400) / 3600) + ' h';
}
export const pad = (n, w = 2) => String(n).padStart(w, '0');

/** The browser's time zone as people write it ("UTC", "CET", "GMT+2"), for a moment. */
const zoneFmt = new Intl.DateTimeFormat('en-GB', { timeZoneName: 'short' });
export function zone(d = new Date()) {
  const part = zoneFmt.formatToParts(d).find((p) => p.type === 'timeZoneName');
  return part ? part.value.replace(/^GMT$/, 'UTC') : '';
}

/** "12:03:10 UTC" (local time, with its zone); with ms "12:03:10.123 UTC". */
export function fmtClock(iso, ms = false) {
  if (!iso) return '—';
  const d = new Date(iso);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}` + (ms ? '.' + pad(d.getMilliseconds(), 3) : '') + ' ' + zone(d);
}
/** "2026-12-02 12:03:10 UTC". */
export function fmtDateTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${fmtClock(iso)}`;
}
/** "in 41 s" / "3 m 2 s ago", refreshed every second by tickRelative(). */
function relText(iso) {
  const s = (new Date(iso).getTime() - Date.now()) / 1000;
  return s >= 0 ? 'in ' + fmtAge(s) : fmtAge(-s) + ' ago';
}
export const rel = (iso) => h('span', { class: 'rel muted', dataset: { at: iso } }, relText(iso));
export function tickRelative() {
  for (const el of document.querySelectorAll('.rel[data-at]')) setText(el, relText(el.dataset.at));
}
/** A time's tooltip: the instant in UTC, whatever the browser's zone. */
export const utcTitle = (iso) => (iso ? iso.replace('T', ' ').replace('Z', ' UTC') : null);
/** A long ID cut for a banner: "N01CIB9V…". */
export const shortId = (id, n = 10) => (id && id.length > n + 1 ? id.slice(0, n) + '…' : id || '');

// ---- subscriber colours -------------------------------------------------------------------

// Distinct hues, none of them the red that means "failed" elsewhere.
const PALETTE = ['#0969da', '#8250df', '#1b7c83', '#bf3989', '#9a6700', '#3e63dd', '#57606a',
  '#2da44e', '#6639ba', '#0550ae', '#a475f9', '#bc4c00'];
const colours = new Map();

/** Every known subscriber name, sorted, gets a colour by its place: the same in every view
 * (the charts, the sparklines, the chips) for as long as the set of names is the same. */
export function setSubscriberNames(names) {
  const sorted = [...new Set(names)].sort();
  const key = sorted.join('\n');
  if (key === colours.key) return;
  colours.clear();
  colours.key = key;
  sorted.forEach((n, i) => colours.set(n, PALETTE[i % PALETTE.length]));
}
export const colourKey = () => colours.key || '';
export function colourOf(name) {
  if (!colours.has(name)) {   // a name not seen in the subscriber list: after the others
    colours.set(name, PALETTE[colours.size % PALETTE.length]);
  }
  return colours.get(name);
}
/** A small dot in the subscriber's colour (CSSOM: no inline style attribute). */
export function dot(name) {
  const el = h('span', { class: 'sub-dot', 'aria-hidden': 'true' });
  el.style.background = colourOf(name);
  return el;
}

/** A delivery state as a badge; `waiting` (ordered delivery) reads like pending. */
export function stateBadge(state, extra = {}) {
  return h('span', { class: 'badge s-' + state, ...extra }, state);
}

export const crumbs = (...more) => h('div', { class: 'crumbs' }, h('a', { href: '#/' }, '← Overview'), ...more);
