/* Relay admin console: plain ES2020, no framework, no build step. Talks to the JSON API in
 * docs/admin-api.md through relative URLs (api/...), so it works behind a path prefix.
 *
 * Stable hooks for browser tests (data-testid):
 *   hub-status        header status pill; data-status = healthy|degraded|down|unreachable|error
 *   overview-tab, dlq-tab                      the two tabs (links to #/ and #/dlq)
 *   search-input      search box (event ID or order number, Enter)
 *   subscribers-table the table; rows: subscriber-row with data-name (and data-state)
 *   state-badge       a subscriber's state in its row (text = the state)
 *   pause-button / resume-button               in a subscriber row
 *   chart-deliveries, chart-backlog            uPlot containers (hold a <canvas> once drawn)
 *   search-view, search-row                    several search results, one row each
 *   event-view        the event page; event-lane per subscriber (data-subscriber, data-state),
 *                     attempt-row per attempt, resend-button in a dead lane
 *   dlq-subscriber, dlq-range                  dead-letter filters
 *   dlq-table, dlq-row (data-event, data-subscriber)
 *   replay-button, replay-confirm, replay-progress   dry run, confirm, progress of a replay
 *   token-input, token-submit                  the admin-token form shown on a 401
 *
 * Routes (location.hash): #/  ·  #/event/ID  ·  #/search/VALUE  ·  #/dlq?subscriber=&range=&since=&until=
 * Every string from the API reaches the page through textContent / attributes (h() below),
 * never through innerHTML.
 */
'use strict';

(() => {
  const POLL_MS = 5000;          // overview, subscribers, charts
  const MAX_BACKOFF_MS = 30000;  // when the admin API is down, poll less and less often
  const GET_TIMEOUT_MS = 10000;   // a poll that hangs longer counts as the API being down
  const POST_TIMEOUT_MS = 60000;  // a replay batch may take a while on a big dead-letter set
  const TOKEN_KEY = 'relay.adminToken';
  const REPLAY_BATCH = 200;
  const STATE_RANK = { open: 0, 'half-open': 1, disabled: 2, paused: 3, active: 4 };
  const PALETTE = ['#0969da', '#8250df', '#1b7c83', '#bf3989', '#6e7781', '#3e63dd', '#a475f9', '#0550ae'];
  const FAIL_COLOUR = '#cf222e';

  // ---- DOM helpers --------------------------------------------------------------------

  const $ = (sel, root = document) => root.querySelector(sel);

  /** h('td', {class: 'num', title: x, dataset: {testid: 'y'}}, 'text', child) — text only. */
  function h(tag, props, ...children) {
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
  function setText(el, s) { s = String(s); if (el.textContent !== s) el.textContent = s; }
  function setAttr(el, k, v) {
    if (v === null || v === undefined) { if (el.hasAttribute(k)) el.removeAttribute(k); }
    else if (el.getAttribute(k) !== String(v)) el.setAttribute(k, v);
  }

  let toastTimer = 0;
  function toast(msg, bad = false) {
    const t = $('#toast');
    t.textContent = msg;
    t.className = bad ? 'toast bad' : 'toast';
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, bad ? 8000 : 4000);
  }

  // ---- formatting -----------------------------------------------------------------------

  const intFmt = new Intl.NumberFormat();
  const fmtInt = (n) => (n === null || n === undefined ? '—' : intFmt.format(n));
  const plural = (n, word) => `${fmtInt(n)} ${word}${n === 1 ? '' : 's'}`;
  const fmtPct = (r) => (r === null || r === undefined ? '—' : (r >= 0.9995 ? '100' : (r * 100).toFixed(1)) + ' %');
  function fmtMs(ms) {
    if (ms === null || ms === undefined) return '—';
    if (ms >= 1000) return (ms / 1000).toFixed(ms >= 10000 ? 0 : 1) + ' s';
    return (ms >= 10 ? Math.round(ms) : ms.toFixed(1)) + ' ms';
  }
  /** 12.5 → "13 s", 412 → "6 m 52 s", 7300 → "2 h 1 m". */
  function fmtAge(s) {
    if (s === null || s === undefined) return '—';
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + ' s';
    if (s < 3600) return Math.floor(s / 60) + ' m ' + (s % 60) + ' s';
    if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' m';
    return Math.floor(s / 86400) + ' d ' + Math.floor((s % 86400) / 3600) + ' h';
  }
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  function fmtClock(iso, ms = false) {
    if (!iso) return '—';
    const d = new Date(iso);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}` + (ms ? '.' + pad(d.getMilliseconds(), 3) : '');
  }
  function fmtDateTime(iso) {
    if (!iso) return '—';
    const d = new Date(iso);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${fmtClock(iso)}`;
  }
  /** "in 41 s" / "3 m 2 s ago", refreshed every second by tickRelative(). */
  function relText(iso) {
    const s = (new Date(iso).getTime() - Date.now()) / 1000;
    return s >= 0 ? 'in ' + fmtAge(s) : fmtAge(-s) + ' ago';
  }
  const rel = (iso) => h('span', { class: 'rel muted', dataset: { at: iso } }, relText(iso));
  function tickRelative() {
    for (const el of document.querySelectorAll('.rel[data-at]')) setText(el, relText(el.dataset.at));
  }
  const utcTitle = (iso) => (iso ? iso + ' (UTC)' : null);

  // ---- API ------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  /** fetch api/<path> as JSON with the session's token; a 401 asks for a token and retries. */
  async function api(path, { method = 'GET', body, timeout = method === 'GET' ? GET_TIMEOUT_MS : POST_TIMEOUT_MS } = {}) {
    for (;;) {
      const token = sessionStorage.getItem(TOKEN_KEY);
      const headers = { Accept: 'application/json' };
      if (token) headers.Authorization = 'Bearer ' + token;
      if (body !== undefined) headers['Content-Type'] = 'application/json';
      const ctrl = new AbortController();
      const timer = setTimeout(() => ctrl.abort(), timeout);
      let res;
      try {
        res = await fetch('api/' + path, {
          method, headers, cache: 'no-store', signal: ctrl.signal,
          body: body === undefined ? undefined : JSON.stringify(body),
        });
      } catch (e) {
        throw new ApiError(0, ctrl.signal.aborted ? 'the admin API did not answer in time' : 'the admin API is unreachable');
      } finally {
        clearTimeout(timer);
      }
      if (res.status === 401) {
        // Another request may already have stored a better token while this one was out.
        if (sessionStorage.getItem(TOKEN_KEY) === token) await askToken(token ? 'That token was refused.' : '');
        continue;
      }
      let data = null;
      try { data = await res.json(); } catch (e) { /* an empty or non-JSON answer */ }
      if (!res.ok) throw new ApiError(res.status, (data && data.error) || `HTTP ${res.status}`);
      return data;
    }
  }

  const query = (params) => {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== '' && v !== null && v !== undefined) q.set(k, v);
    const s = q.toString();
    return s ? '?' + s : '';
  };
  const seg = encodeURIComponent;

  // ---- token form -------------------------------------------------------------------------

  // One form for every request waiting on a 401: they all resume when a token is stored.
  let tokenWaiters = null;
  function askToken(error) {
    const dlg = $('#token-dialog');
    const err = $('#token-error');
    err.textContent = error;
    err.hidden = !error;
    if (!tokenWaiters) {
      tokenWaiters = [];
      $('#token-input').value = '';
      if (!dlg.open) dlg.showModal();
      $('#token-input').focus();
    }
    return new Promise((resolve) => tokenWaiters.push(resolve));
  }
  function initTokenForm() {
    const dlg = $('#token-dialog');
    $('#token-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const value = $('#token-input').value.trim();
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      dlg.close();
      const waiting = tokenWaiters || [];
      tokenWaiters = null;
      waiting.forEach((resolve) => resolve());
    });
    // Escape would leave every request waiting forever; the form stays until a token is given.
    dlg.addEventListener('cancel', (e) => e.preventDefault());
  }

  // ---- header strip -----------------------------------------------------------------------

  const hub = { failures: 0, lastOk: null, subscribers: [], stats: null };

  function renderOverview(o) {
    const pill = $('[data-testid="hub-status"]');
    setAttr(pill, 'data-status', o.status);
    setText($('.word', pill), o.status);
    setAttr(pill, 'title', [`Redis ${o.redis && o.redis.reachable ? (o.redis.version || '') + ' ' + (o.redis.role || '') : 'unreachable'}`,
      `${(o.workers || []).length} worker(s) seen`, `${fmtInt(o.queueMessages)} queued, ${fmtInt(o.retriesScheduled)} scheduled`].join(' · '));
    $('.stats').classList.remove('stale');
    document.querySelector('main').classList.remove('stale');
    setText($('#stat-accepted'), fmtInt(o.acceptedLastHour));
    setText($('#stat-delivered'), fmtInt(o.deliveredLastHour));
    setText($('#stat-failed'), fmtInt(o.failedLastHour));
    const dead = $('#stat-dead');
    setText(dead, fmtInt(o.deadLetters));
    dead.classList.toggle('bad', o.deadLetters > 0);
    setText($('#stat-backlog'), fmtAge(o.backlogOldestSeconds));
    const count = $('#dlq-count');
    setText(count, o.deadLetters > 0 ? fmtInt(o.deadLetters) : '');
    count.classList.toggle('bad', o.deadLetters > 0);
    showNotice((o.reasons || []).length ? (o.status === 'down' ? 'Down: ' : 'Degraded: ') + o.reasons.join(' · ') : '', o.status === 'down');
    hub.lastOk = new Date();
    setText($('#updated'), 'updated ' + fmtClock(hub.lastOk.toISOString()));
  }

  function renderOverviewError(e) {
    const pill = $('[data-testid="hub-status"]');
    const word = e.status === 0 ? 'unreachable' : 'error';
    setAttr(pill, 'data-status', word);
    setText($('.word', pill), word);
    // Keep the last figures, greyed, rather than blanks: they are still the best known.
    $('.stats').classList.add('stale');
    document.querySelector('main').classList.add('stale');
    const what = e.status === 0 ? `The ${e.message.replace(/^the /, '')}` : `The admin API answered HTTP ${e.status}: ${e.message}`;
    const since = hub.lastOk ? ` What is shown is from ${fmtClock(hub.lastOk.toISOString())}.` : '';
    showNotice(`${what}. Retrying in ${Math.round(pollDelay() / 1000)} s.${since}`, true);
  }

  function showNotice(text, bad) {
    const n = $('#notice');
    setText(n, text);
    n.classList.toggle('bad', !!bad);
    n.hidden = !text;
  }

  // ---- subscribers table ------------------------------------------------------------------

  const rows = new Map();   // name → {tr, cells}; rows are updated in place, never rebuilt

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

  function renderSubscribers(list) {
    hub.subscribers = list;
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
    if (!$('#view-dlq').hidden) syncDlqForm(currentRoute().params);   // the filter lists every name
  }

  function subscribersError(e) {
    if (rows.size) return;
    $('#subs-body').replaceChildren(h('tr', { class: 'empty' }, h('td', { colspan: 11 }, 'Could not load subscribers: ' + e.message)));
  }

  function updateRow({ tr, c }, s) {
    const removed = s.configured === false;
    setAttr(tr, 'data-state', s.state);
    if (!c.name.firstChild) c.name.append(h('span'), h('span', { class: 'removed' }));
    setText(c.name.firstChild, s.name);
    setText(c.name.lastChild, removed ? 'removed' : '');
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

  // ---- sparklines (inline SVG: sixty points per row do not need a chart each) -------------

  // A fixed template (no API data in it): area under the line, the line, failure ticks, tooltip.
  const SPARK = '<svg class="spark" viewBox="0 0 120 24" preserveAspectRatio="none">'
    + '<path class="a"/><path class="d"/><path class="f"/><title></title></svg>';
  function makeSpark() {
    const t = document.createElement('template');
    t.innerHTML = SPARK;
    return t.content.firstChild;
  }

  function updateSpark(svg, delivered, failed) {
    const n = delivered.length;
    const max = Math.max(1, ...delivered, ...failed);
    const x = (i) => (n > 1 ? (i * 120) / (n - 1) : 60).toFixed(1);
    const y = (v) => (23 - (v / max) * 21).toFixed(1);
    const line = delivered.map((v, i) => (i ? 'L' : 'M') + x(i) + ' ' + y(v)).join('');
    const [area, dline, fails, title] = svg.children;
    setAttr(area, 'd', n ? line + `L120 24L0 24Z` : '');
    setAttr(dline, 'd', line);
    setAttr(fails, 'd', failed.map((v, i) => (v ? `M${x(i)} 24V${y(v)}` : '')).join(''));
    const sum = (a) => a.reduce((p, q) => p + q, 0);
    setText(title, `last hour: ${fmtInt(sum(delivered))} delivered, ${fmtInt(sum(failed))} failed`);
  }

  // ---- charts (uPlot; one instance each, fed with setData so refreshes do not flicker) ----

  const charts = { deliveries: null, backlog: null, key: '' };

  function baseOpts(el, yLabel, series, yAxis = {}) {
    const axis = { stroke: '#656d76', font: '11px system-ui, sans-serif', labelFont: '11px system-ui, sans-serif',
      grid: { stroke: '#eceef1', width: 1 }, ticks: { stroke: '#dde1e6', width: 1, size: 4 } };
    return {
      width: chartWidth(el), height: 220,
      cursor: { y: false, drag: { x: false, y: false } },   // no zoom: the next refresh would reset it
      legend: { markers: { width: 0, fill: (u, i) => series[i - 1] && series[i - 1].stroke } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max * 1.1, 5)] } },
      axes: [{ ...axis, values: (u, splits) => splits.map(hhmm) },
        { ...axis, label: yLabel, labelSize: 16, size: 48, ...yAxis }],
      series: [{ label: 'time', value: (u, v) => (v === null ? '—' : fmtClock(new Date(v * 1000).toISOString())) }, ...series],
    };
  }
  const chartWidth = (el) => Math.max(300, el.clientWidth - 8);
  const hhmm = (t) => { const d = new Date(t * 1000); return pad(d.getHours()) + ':' + pad(d.getMinutes()); };
  // Backlog ticks land on whole seconds, minutes or hours, and say which.
  const AGE_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 86400];
  const ageTick = (v) => (v >= 3600 ? v / 3600 + ' h' : v >= 60 ? v / 60 + ' m' : v + ' s');

  function renderStats(st) {
    const names = Object.keys(st.subscribers || {}).sort();
    const key = names.join('\n');
    const t = st.t || [];
    const dData = [t, ...names.map((n) => st.subscribers[n].delivered), st.failed || []];
    const bData = [t, st.backlogAgeSeconds || []];
    const dEl = $('#chart-deliveries');
    const bEl = $('#chart-backlog');
    if (dEl.clientWidth === 0 || typeof uPlot === 'undefined') return;   // hidden: drawn by the next poll

    if (!charts.deliveries || charts.key !== key) {
      // The subscriber set changed (rare): the series change, so the chart is built again.
      if (charts.deliveries) charts.deliveries.destroy();
      const series = names.map((n, i) => ({ label: n, stroke: PALETTE[i % PALETTE.length], width: 1.5, value: (u, v) => fmtInt(v) }));
      series.push({ label: 'failed (all)', stroke: FAIL_COLOUR, width: 1.5, fill: 'rgba(207,34,46,0.10)', value: (u, v) => fmtInt(v) });
      const COUNT_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];
      charts.deliveries = new uPlot(baseOpts(dEl, 'per minute', series, { incrs: COUNT_INCRS }), dData, dEl);
      charts.key = key;
    } else {
      charts.deliveries.setData(dData);
    }
    const none = (arr) => !arr || arr.every((v) => !v);
    const quiet = dData.slice(1).every(none);
    chartMessage(dEl, !quiet ? null : none(st.accepted)
      ? ['No events in the last hour. Send one with ', h('code', {}, 'relay send FILE'), '.']
      : ['Events arrived, but no delivery was attempted in the last hour.']);
    chartMessage(bEl, null);

    if (!charts.backlog) {
      charts.backlog = new uPlot(baseOpts(bEl, 'age', [{
        label: 'oldest backlog', stroke: '#57606a', width: 1.5, fill: 'rgba(87,96,106,0.08)',
        value: (u, v) => (v === null ? '—' : fmtAge(v)),
      }], { incrs: AGE_INCRS, values: (u, splits) => splits.map(ageTick) }), bData, bEl);
    } else {
      charts.backlog.setData(bData);
    }
  }

  /** A line over the chart (faded behind it) for "nothing to show" and "could not load". */
  function chartMessage(el, parts) {
    const msg = $('.chart-empty', el);
    const text = parts ? parts.map((p) => (p instanceof Node ? p.textContent : p)).join('') : '';
    if (msg.textContent !== text) msg.replaceChildren(...(parts || []));
    msg.hidden = !parts;
  }

  function statsError(e) {
    if (charts.deliveries) return;   // keep the last lines; the header says the API failed
    for (const id of ['#chart-deliveries', '#chart-backlog']) chartMessage($(id), ['No chart data: ' + e.message]);
  }

  function initChartResize() {
    // Keep each chart as wide as its card (the grid reflows from two columns to one at 1100 px).
    const ro = new ResizeObserver(() => {
      for (const [id, chart] of [['#chart-deliveries', charts.deliveries], ['#chart-backlog', charts.backlog]]) {
        const el = $(id);
        if (chart && el.clientWidth && chart.width !== chartWidth(el)) chart.setSize({ width: chartWidth(el), height: 220 });
      }
    });
    ro.observe($('#chart-deliveries'));
    ro.observe($('#chart-backlog'));
  }

  function renderSparks(st) {
    for (const [name, row] of rows) {
      const s = (st.subscribers || {})[name];
      updateSpark(row.c.spark.firstChild, s ? s.delivered : [], s ? s.failed : []);
    }
  }

  // ---- event view -------------------------------------------------------------------------

  const ev = { id: null, lanesKey: '' };
  const LIVE_STATES = new Set(['pending', 'retrying']);

  async function openEvent(id) {
    const view = $('#view-event');
    if (ev.id !== id) {
      ev.id = id;
      ev.lanesKey = '';
      view.replaceChildren(h('div', { class: 'card message' }, 'Loading event ', id, '…'));
    }
    try {
      const e = await api('events/' + seg(id));
      if (ev.id !== id) return;   // the operator moved on while this was loading
      if (!view.querySelector('.event-head')) renderEventPage(view, e); else renderLanes(e);
    } catch (err) {
      if (ev.id !== id) return;
      if (err.status === 404) {
        view.replaceChildren(crumbs(), h('div', { class: 'card message' }, h('strong', {}, 'No event ' + id),
          'It is unknown or has expired. Search its order number instead, or check the ID.'));
      } else if (!view.querySelector('.event-head')) {
        view.replaceChildren(crumbs(), h('div', { class: 'card message' }, h('strong', {}, 'Could not load event ' + id), err.message));
      }
    }
  }

  const crumbs = () => h('div', { class: 'crumbs' }, h('a', { href: '#/' }, '← Overview'));

  function renderEventPage(view, e) {
    const orders = (e.orderNumbers || []).length
      ? e.orderNumbers.map((o) => h('a', { class: 'chip', href: '#/search/' + seg(o), title: 'Every event for order ' + o }, o))
      : h('span', { class: 'muted' }, 'none');
    const head = h('div', { class: 'card' },
      h('dl', { class: 'event-head' },
        h('dt', {}, 'Event'), h('dd', { class: 'event-id' }, e.eventId),
        h('dt', {}, 'Received'), h('dd', { title: utcTitle(e.receivedAt) }, fmtDateTime(e.receivedAt), ' ', rel(e.receivedAt)),
        h('dt', {}, 'Topic'), h('dd', {}, e.topic || '—'),
        h('dt', {}, 'Event types'), h('dd', {}, (e.eventTypes || []).map((t) => h('span', { class: 'chip' }, t))),
        h('dt', {}, 'Orders'), h('dd', {}, orders)),
      h('div', { class: 'verdict', id: 'verdict' }));
    view.replaceChildren(crumbs(), head, renderBody(e), h('div', { class: 'lanes', id: 'lanes' }));
    renderLanes(e);
  }

  function renderBody(e) {
    if (e.bodyExpired || e.body === null || e.body === undefined) {
      return h('div', { class: 'card message' },
        'The stored body has expired, so it cannot be shown or resent. Delivery records remain below.');
    }
    const text = JSON.stringify(e.body, null, 2);
    const lines = text.split('\n').length;
    // Open by default, height-capped: the lanes below stay within reach.
    return h('details', { class: 'card body', open: true },
      h('summary', {}, 'Body', h('span', { class: 'hint' }, `${fmtInt(lines)} lines · ${fmtInt(new Blob([text]).size)} bytes`)),
      h('pre', { testid: 'event-body' }, text));
  }

  function renderLanes(e) {
    const deliveries = e.deliveries || [];
    const key = JSON.stringify(deliveries);
    if (key === ev.lanesKey) return;   // nothing changed: leave the DOM (and the reader) alone
    ev.lanesKey = key;
    ev.live = deliveries.some((d) => LIVE_STATES.has(d.state));
    renderVerdict(deliveries);
    const lanes = $('#lanes');
    if (!deliveries.length) {
      lanes.replaceChildren(h('div', { class: 'card message' }, h('strong', {}, 'No subscriber takes this event'),
        'No subscriber’s filters matched its event types, so nothing was sent. ', h('code', {}, 'relay check-config'), ' shows each filter.'));
      return;
    }
    lanes.replaceChildren(...deliveries.map((d) => renderLane(e, d)));
  }

  function renderVerdict(deliveries) {
    const counts = {};
    for (const d of deliveries) counts[d.state] = (counts[d.state] || 0) + 1;
    const parts = ['delivered', 'retrying', 'pending', 'paused', 'dead'].filter((s) => counts[s])
      .map((s) => h('span', { class: 'badge mini s-' + s }, `${counts[s]} ${s}`));
    $('#verdict').replaceChildren(
      h('strong', {}, `Delivered to ${counts.delivered || 0} of ${plural(deliveries.length, 'subscriber')}`), ...parts);
  }

  function renderLane(e, d) {
    const detail = [];
    if (d.state === 'retrying' && d.nextAttemptAt) {
      const at = d.nextAttemptAt;
      detail.push(h('span', { class: 'detail warn', title: utcTitle(at) }, 'next attempt ', fmtClock(at), ' (', rel(at), ')'));
    } else if (d.state === 'dead') {
      detail.push(h('span', { class: 'detail bad' }, d.deadReason || 'dead'));
    } else if (d.state === 'paused') {
      detail.push(h('span', { class: 'detail' }, 'subscriber paused; delivery waits'));
    } else if (d.state === 'pending') {
      detail.push(h('span', { class: 'detail' }, 'queued for a worker'));
    }
    if (d.configured === false) detail.push(h('span', { class: 'detail' }, '· subscriber no longer configured'));
    const head = h('div', { class: 'card-head' },
      h('h2', {}, d.subscriber), h('span', { class: 'badge s-' + d.state }, d.state), ...detail, h('span', { class: 'spacer' }));
    if (d.state === 'dead') head.append(resendButton(e, d));
    const attempts = d.attempts || [];
    const body = attempts.length ? attemptsTable(e, attempts)
      : h('div', { class: 'none' }, d.state === 'dead' ? 'No attempt was made.' : 'No attempts yet.');
    return h('div', { class: 'card lane', testid: 'event-lane', dataset: { subscriber: d.subscriber, state: d.state } }, head, body);
  }

  function resendButton(e, d) {
    const why = e.bodyExpired ? 'the stored body has expired' : d.configured === false ? 'the subscriber is no longer configured' : '';
    return h('button', {
      type: 'button', class: 'btn', testid: 'resend-button', disabled: !!why,
      title: why ? 'Cannot replay: ' + why : `Deliver this event to ${d.subscriber} again, with fresh attempts`,
      onclick: (ev2) => resend(ev2.currentTarget, e.eventId, d.subscriber),
    }, 'Replay to this subscriber');
  }

  async function resend(btn, id, subscriber) {
    btn.disabled = true;
    try {
      const r = await api(`events/${seg(id)}/resend`, { method: 'POST', body: { subscriber } });
      toast(`Queued ${fmtInt(r.queued)} delivery to ${subscriber}`);
      setTimeout(() => { if (ev.id === id) openEvent(id); }, 800);
    } catch (e) {
      btn.disabled = false;
      toast(`Replay to ${subscriber} failed: ${e.message}`, true);
    }
  }

  function attemptsTable(e, attempts) {
    const t0 = new Date(e.receivedAt).getTime();
    const rowsEls = attempts.map((a) => {
      const ok = a.status !== null && a.status >= 200 && a.status < 300;
      const delta = (new Date(a.at).getTime() - t0) / 1000;
      return h('tr', { testid: 'attempt-row' },
        h('td', { class: 'c-n' }, a.attempt),
        h('td', { class: 'c-time', title: utcTitle(a.at) }, fmtClock(a.at, true),
          Number.isFinite(delta) ? h('span', { class: 'delta' }, '+' + fmtAge(delta)) : null),
        h('td', { class: 'c-status ' + (ok ? 'st-ok' : 'st-bad') }, a.status === null ? 'no answer' : a.status),
        h('td', { class: 'num c-lat' }, fmtMs(a.latencyMs)),
        h('td', { class: 'c-error', title: a.error || null }, a.error || ''));
    });
    return h('table', { class: 'grid attempts' },
      h('thead', {}, h('tr', {}, h('th', { class: 'c-n' }, '#'), h('th', { class: 'c-time' }, 'Time'), h('th', { class: 'c-status' }, 'Status'),
        h('th', { class: 'num c-lat' }, 'Latency'), h('th', { class: 'c-error' }, 'Error'))),
      h('tbody', {}, rowsEls));
  }

  // ---- search -----------------------------------------------------------------------------

  async function runSearch(value) {
    const view = $('#view-search');
    view.replaceChildren(h('div', { class: 'card message' }, 'Looking for ', value, '…'));
    try {
      try {
        await api('events/' + seg(value));
        if (currentRoute().value === value) location.replace('#/event/' + seg(value));   // Back skips the search
        return;
      } catch (e) {
        if (e.status !== 404) throw e;
      }
      const r = await api('events' + query({ order: value, limit: 100 }));
      if (currentRoute().value !== value) return;
      const found = r.events || [];
      if (found.length === 1) { location.replace('#/event/' + seg(found[0].eventId)); return; }
      view.replaceChildren(crumbs(), found.length ? resultsCard(value, found, r.next) : notFound(value));
    } catch (e) {
      view.replaceChildren(crumbs(), h('div', { class: 'card message' }, h('strong', {}, 'Search failed'), e.message));
    }
  }

  const notFound = (value) => h('div', { class: 'card message' },
    h('strong', {}, `Nothing found for “${value}”`),
    'No event has that ID and no event carries that order number. An event ID looks like N01CIB9VVFYKR9J6ZW, an order number like 20-RD128. ',
    'If the event never reached the hub, ask the sender to post it again, or send one with ', h('code', {}, 'relay send FILE'), '.');

  function resultsCard(value, events, more) {
    const open = (id) => () => { location.hash = '#/event/' + seg(id); };
    const tr = (e) => h('tr', { testid: 'search-row', class: 'link', dataset: { event: e.eventId }, onclick: open(e.eventId) },
      h('td', { title: utcTitle(e.receivedAt) }, fmtDateTime(e.receivedAt)),
      h('td', {}, h('a', { href: '#/event/' + seg(e.eventId) }, e.eventId)),
      h('td', {}, (e.eventTypes || []).join(', ')),
      h('td', {}, (e.orderNumbers || []).join(', ')),
      h('td', {}, Object.entries(e.states || {}).map(([sub, st]) => h('span', { class: 'badge mini s-' + st }, sub + ': ' + st))));
    return h('div', { class: 'card' },
      h('div', { class: 'card-head' },
        h('h2', {}, `${events.length}${more ? '+' : ''} events for order ${value}`), h('span', { class: 'hint' }, 'newest first')),
      h('div', { class: 'scroll-x' }, h('table', { class: 'grid' },
        h('thead', {}, h('tr', {}, ['Received', 'Event', 'Types', 'Orders', 'Deliveries'].map((x) => h('th', {}, x)))),
        h('tbody', {}, events.map(tr)))));
  }

  function initSearch() {
    const input = $('#search-input');
    $('#search-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      // Through the hash, so every search is linkable and Back returns to it.
      const target = '#/search/' + seg(value);
      if (location.hash === target) runSearch(value); else location.hash = target;
    });
    document.addEventListener('keydown', (e) => {
      if (e.key !== '/' || /^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement.tagName)) return;
      e.preventDefault();
      input.focus();
      input.select();
    });
  }

  // ---- dead letters -----------------------------------------------------------------------

  const dlq = { filters: {}, next: null, loading: false, replaying: false };
  const RANGES = { '1h': 3600, '24h': 86400, '7d': 7 * 86400 };

  /** The API filters for the current hash: a preset range becomes an absolute `since`. */
  function dlqFilters(params) {
    const f = { subscriber: params.get('subscriber') || '' };
    const range = params.get('range') || '';
    if (RANGES[range]) f.since = new Date(Date.now() - RANGES[range] * 1000).toISOString();
    if (range === 'custom') {
      for (const k of ['since', 'until']) if (params.get(k)) f[k] = new Date(params.get(k)).toISOString();
    }
    return f;
  }

  function openDlq(params) {
    syncDlqForm(params);
    dlq.filters = dlqFilters(params);
    if (!dlq.replaying) $('#replay-panel').hidden = true;
    loadDlq(false);
  }

  function syncDlqForm(params) {
    const form = $('#dlq-filters');
    const select = form.elements.subscriber;
    const names = hub.subscribers.map((s) => s.name);
    const wanted = params.get('subscriber') || '';
    if (wanted && !names.includes(wanted)) names.push(wanted);
    const have = [...select.options].slice(1).map((o) => o.value);
    if (have.join('\n') !== names.join('\n')) {
      select.replaceChildren(h('option', { value: '' }, 'All'), ...names.map((n) => h('option', { value: n }, n)));
    }
    select.value = wanted;
    form.elements.range.value = params.get('range') || '';
    $('.custom-range', form).hidden = form.elements.range.value !== 'custom';
    form.elements.since.value = params.get('since') || '';
    form.elements.until.value = params.get('until') || '';
  }

  async function loadDlq(more) {
    if (dlq.loading) return;
    dlq.loading = true;
    const body = $('#dlq-body');
    try {
      const r = await api('dlq' + query({ ...dlq.filters, limit: 50, cursor: more ? dlq.next : '' }));
      const letters = r.deadLetters || [];
      if (!more) body.replaceChildren();
      body.append(...letters.map(dlqRow));
      dlq.next = r.next;
      dlq.total = r.total;
      $('#dlq-more').hidden = !r.next;
      setText($('#dlq-total'), plural(r.total, 'dead letter'));
      $('#dlq-replay').disabled = !r.total || dlq.replaying;
      if (!body.children.length) {
        const filtered = dlq.filters.subscriber || dlq.filters.since || dlq.filters.until;
        body.append(h('tr', { class: 'empty' }, h('td', { colspan: 7 }, filtered
          ? 'No dead letters match these filters.'
          : 'No dead letters. Deliveries that fail every attempt land here, to be replayed once the subscriber is fixed.')));
      }
    } catch (e) {
      if (!more) body.replaceChildren(h('tr', { class: 'empty' }, h('td', { colspan: 7 }, 'Could not load dead letters: ' + e.message)));
      else toast('Could not load more: ' + e.message, true);
    } finally {
      dlq.loading = false;
    }
  }

  function dlqRow(d) {
    return h('tr', { testid: 'dlq-row', dataset: { event: d.eventId, subscriber: d.subscriber } },
      h('td', { title: utcTitle(d.deadAt) }, fmtDateTime(d.deadAt)),
      h('td', {}, d.subscriber, d.configured === false ? h('span', { class: 'muted' }, ' (removed)') : null),
      h('td', {}, h('a', { href: '#/event/' + seg(d.eventId) }, d.eventId)),
      h('td', {}, (d.orderNumbers || []).join(', ') || '—'),
      h('td', { class: 'num' }, fmtInt(d.attempts)),
      h('td', {}, d.reason || '—'),
      h('td', { class: 'c-error', title: d.lastError || null }, d.lastError || '—'));
  }

  function initDlq() {
    const form = $('#dlq-filters');
    form.addEventListener('change', () => {
      const el = form.elements;
      const custom = el.range.value === 'custom';
      $('.custom-range', form).hidden = !custom;
      const hash = '#/dlq' + query({ subscriber: el.subscriber.value, range: el.range.value,
        since: custom ? el.since.value : '', until: custom ? el.until.value : '' });
      if (location.hash !== hash) location.hash = hash;
    });
    form.addEventListener('submit', (e) => e.preventDefault());
    $('#dlq-more').addEventListener('click', () => loadDlq(true));
    $('#dlq-replay').addEventListener('click', replayDryRun);
    $('#replay-cancel').addEventListener('click', () => { $('#replay-panel').hidden = true; });
    $('#replay-confirm').addEventListener('click', replayRun);
  }

  function replayPanel(text, mode) {
    const panel = $('#replay-panel');
    panel.hidden = false;
    panel.className = 'replay-panel' + (mode ? ' ' + mode : '');
    setText($('#replay-text'), text);
  }

  /** Step one: ask the hub how many would be replayed, and ask the operator. */
  async function replayDryRun() {
    const filters = { ...dlq.filters };
    for (const k of Object.keys(filters)) if (!filters[k]) delete filters[k];
    try {
      const r = await api('replay', { method: 'POST', body: { ...filters, dryRun: true } });
      dlq.pending = filters;
      $('#replay-progress').hidden = true;
      $('#replay-cancel').hidden = false;
      const confirm = $('#replay-confirm');
      confirm.hidden = !r.matched;
      setText(confirm, `Replay ${fmtInt(r.matched)}`);
      replayPanel(r.matched ? `${plural(r.matched, 'dead letter')} match${r.matched === 1 ? 'es' : ''}; replay ${r.matched === 1 ? 'it' : 'them'}?`
        : 'No dead letters match these filters.', '');
    } catch (e) {
      replayPanel('Could not count dead letters: ' + e.message, 'failed');
    }
  }

  /** Step two: replay in batches so the bar moves, until the hub says none remain. */
  async function replayRun() {
    const filters = dlq.pending;
    const bar = $('#replay-progress');
    dlq.replaying = true;
    $('#replay-confirm').hidden = true;
    $('#replay-cancel').hidden = true;
    $('#dlq-replay').disabled = true;
    bar.hidden = false;
    let done = 0;
    try {
      for (;;) {
        const r = await api('replay', { method: 'POST', body: { ...filters, dryRun: false, limit: REPLAY_BATCH } });
        done += r.replayed;
        bar.max = Math.max(1, done + r.remaining);
        bar.value = done;
        replayPanel(`Replaying… ${fmtInt(done)} of ${fmtInt(done + r.remaining)}`, '');
        // Stop when none remain, or when a batch moved nothing (the rest cannot be replayed).
        if (!r.remaining || !r.replayed) {
          if (r.remaining) replayPanel(`Replayed ${fmtInt(done)}; ${fmtInt(r.remaining)} could not be replayed.`, 'failed');
          else replayPanel(`Replayed ${plural(done, 'dead letter')}.`, 'done');
          break;
        }
      }
    } catch (e) {
      replayPanel(`Replay stopped after ${fmtInt(done)}: ${e.message}`, 'failed');
    } finally {
      dlq.replaying = false;
      $('#replay-cancel').hidden = false;
      setText($('#replay-cancel'), 'Close');
      loadDlq(false);
      poll.now();
    }
  }

  // ---- routing ------------------------------------------------------------------------------

  function currentRoute() {
    const raw = location.hash.replace(/^#\/?/, '');
    const [path, qs] = raw.split('?');
    const parts = path.split('/').filter(Boolean).map((p) => { try { return decodeURIComponent(p); } catch (e) { return p; } });
    const params = new URLSearchParams(qs || '');
    if (parts[0] === 'event' && parts[1]) return { view: 'event', value: parts[1], params };
    if (parts[0] === 'search' && parts[1]) return { view: 'search', value: parts[1], params };
    if (parts[0] === 'dlq') return { view: 'dlq', params };
    return { view: 'overview', params };
  }

  function route() {
    const r = currentRoute();
    for (const v of ['overview', 'event', 'search', 'dlq']) $('#view-' + v).hidden = v !== r.view;
    for (const a of document.querySelectorAll('.tabs a')) a.classList.toggle('active', a.dataset.view === r.view);
    if (r.view !== 'event') ev.id = null;
    if (r.view === 'search' || r.view === 'event') $('#search-input').value = r.value;
    const titles = { overview: 'Relay console', dlq: 'Dead letters', event: `Event ${r.value}`, search: `Search ${r.value}` };
    document.title = r.view === 'overview' ? titles.overview : `${titles[r.view]} · Relay`;
    if (r.view === 'event') openEvent(r.value);
    else if (r.view === 'search') runSearch(r.value);
    else if (r.view === 'dlq') openDlq(r.params);
    else poll.now();   // charts drawn while hidden have no width; draw them now
    window.scrollTo(0, 0);
  }

  // ---- polling ------------------------------------------------------------------------------

  const pollDelay = () => Math.min(MAX_BACKOFF_MS, POLL_MS * 2 ** Math.min(hub.failures, 3));

  const poll = (() => {
    let timer = 0;
    let running = false;
    let again = false;   // asked for while a tick was out: run once more as soon as it ends
    async function tick() {
      clearTimeout(timer);
      if (running) { again = true; return; }
      running = true;
      again = false;
      try {
        await refresh();
      } finally {
        running = false;
        // Hidden tabs poll rarely; visibilitychange polls at once when the tab returns.
        timer = setTimeout(tick, again ? 0 : document.hidden ? MAX_BACKOFF_MS : pollDelay());
      }
    }
    return { now: tick };
  })();

  async function refresh() {
    const r = currentRoute();
    const jobs = [api('overview').then((o) => { hub.failures = 0; renderOverview(o); }, (e) => { hub.failures++; renderOverviewError(e); })];
    if (hub.failures > 0) { await jobs[0]; if (hub.failures > 0) return; }   // the API is down: one request per tick
    // A failed refresh leaves the last figures in place (the header says why); only a view
    // that never loaded says so itself.
    if (r.view === 'overview' || !hub.subscribers.length) {
      jobs.push(api('subscribers').then(renderSubscribers, subscribersError));
    }
    if (r.view === 'overview') {
      jobs.push(api('stats?minutes=60').then((st) => { hub.stats = st; renderStats(st); renderSparks(st); }, statsError));
    }
    // An event still in flight is followed live until every lane settles.
    if (r.view === 'event' && ev.live) jobs.push(openEvent(r.value));
    await Promise.allSettled(jobs);
  }

  // ---- start --------------------------------------------------------------------------------

  function start() {
    if (typeof uPlot === 'undefined') showNotice('The chart library (static/vendor/uPlot.iife.min.js) did not load; charts are off.', true);
    initTokenForm();
    initSearch();
    initDlq();
    initChartResize();
    window.addEventListener('hashchange', route);
    // The tab of the view already open reloads it (the hash does not change, so no hashchange).
    $('.tabs').addEventListener('click', (e) => { if (e.target.closest('a') && e.target.closest('a').hash === location.hash) route(); });
    document.addEventListener('visibilitychange', () => { if (!document.hidden) poll.now(); });
    setInterval(tickRelative, 1000);
    route();   // polls at once on the overview
    if (currentRoute().view !== 'overview') poll.now();
  }

  start();
})();
