/* Relay admin console: plain ES modules, no framework, no build step, served by the hub.
 * This module routes (location.hash), polls and draws the header strip; each page is a
 * module of its own (overview, events, event, order, dlq), the API client is api.js and the
 * charts charts.js.
 *
 * Stable hooks for browser tests (data-testid):
 *   hub-status        header status pill; data-status = healthy|degraded|down|unreachable|error;
 *                     hub-reason beside it: why it is not healthy
 *   overview-tab, events-tab, dlq-tab          the tabs
 *   search-input      search box (event ID or order number, Enter)
 *   subscribers-table the table; rows: subscriber-row with data-name (and data-state)
 *   state-badge       a subscriber's state in its row (text = the state)
 *   pause-button / resume-button               in a subscriber row
 *   chart-range       the range buttons (data-range 1h|6h|24h, aria-pressed)
 *   chart-deliveries, chart-failures, chart-backlog   uPlot containers (a <canvas> once drawn)
 *   events-view, events-row (data-event), events-more, events-subscriber, events-state,
 *                     events-order, events-range   the events page and its filters
 *   event-view        the event page; event-lane per subscriber (data-subscriber, data-state),
 *                     attempt-row per attempt (data-attempt, data-trigger) with attempt-tag,
 *                     attempt-detail (request-pane, response-pane, response-body, truncated,
 *                     no-answer, copy-request, copy-response), run-head (data-trigger),
 *                     waiting-for, resend-button
 *   order-view (data-order), order-row (data-event), order-state (data-subscriber),
 *                     ordering-banner (data-subscriber, data-state), banner-replay, banner-purge
 *   dlq-subscriber, dlq-range                  dead-letter filters
 *   dlq-table, dlq-row (data-event, data-subscriber), dlq-select, dlq-select-all,
 *                     dlq-row-replay, dlq-row-delete, dlq-replay-selected, dlq-delete-selected
 *   replay-button, purge-button; the panel's confirm: replay-confirm | delete-confirm |
 *                     purge-confirm; replay-progress
 *   token-input, token-submit, token-cancel    the admin-token dialog shown on a 401
 *   token-prompt, token-forget                 enter the token after dismissing it; forget it
 *
 * Routes: #/?range=  ·  #/events?…  ·  #/event/ID  ·  #/order/NUMBER  ·  #/search/VALUE  ·
 *         #/dlq?subscriber=&range=&since=&until=
 */

import { ApiError, api, forgetToken, hasToken, initTokenDialog, onToken, promptToken, seg } from './api.js';
import { $, fmtAge, fmtClock, fmtInt, h, setAttr, setSubscriberNames, setText, showNotice, tickRelative, toast } from './dom.js';
import { initDlq, openDlq, syncDlqSubscribers } from './dlq.js';
import { ev, leaveEvent, openEvent } from './event.js';
import { initEvents, openEvents, syncSubscriberSelect } from './events.js';
import { leaveOrder, openOrder, order } from './order.js';
import { hub, initOverview, refreshOverview } from './overview.js';

const POLL_MS = 5000;          // overview, subscribers, charts
const MAX_BACKOFF_MS = 30000;  // when the admin API is down, poll less and less often
const VIEWS = ['overview', 'events', 'event', 'order', 'search', 'dlq'];
const state = { failures: 0, lastOk: null, needsToken: false, looking: false };

// ---- header strip -------------------------------------------------------------------------

function renderOverview(o) {
  const pill = $('[data-testid="hub-status"]');
  setAttr(pill, 'data-status', o.status);
  setText($('.word', pill), o.status);
  setAttr(pill, 'title', [`Redis ${o.redis && o.redis.reachable ? (o.redis.version || '') + ' ' + (o.redis.role || '') : 'unreachable'}`,
    `${(o.workers || []).length} worker(s) seen`, `${fmtInt(o.queueMessages)} queued, ${fmtInt(o.retriesScheduled)} scheduled`].join(' · '));
  const reasons = o.reasons || [];
  const reason = $('[data-testid="hub-reason"]');
  setText(reason, reasons.length ? reasons[0] + (reasons.length > 1 ? ` (+${reasons.length - 1} more)` : '') : '');
  setAttr(reason, 'title', reasons.length ? reasons.join('\n') : null);
  hub.failing = new Set(o.failingSubscribers || []);
  for (const tr of document.querySelectorAll('[data-testid="subscriber-row"]')) tr.classList.toggle('failing', hub.failing.has(tr.dataset.name));
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
  showNotice(reasons.length ? (o.status === 'down' ? 'Down: ' : 'Degraded: ') + reasons.join(' · ') : '', o.status === 'down');
  state.lastOk = new Date();
  setText($('#updated'), 'updated ' + fmtClock(state.lastOk.toISOString()));
}

function renderOverviewError(e) {
  const pill = $('[data-testid="hub-status"]');
  const word = e.status === 0 ? 'unreachable' : e.status === 401 ? 'locked' : 'error';
  setAttr(pill, 'data-status', word);
  setText($('.word', pill), word);
  setText($('[data-testid="hub-reason"]'), '');
  // Keep the last figures, greyed, rather than blanks: they are still the best known.
  $('.stats').classList.add('stale');
  document.querySelector('main').classList.add('stale');
  if (e.status === 401) {
    state.needsToken = true;
    showNotice(['This hub needs its admin token (admin.token) to show anything. ',
      h('button', { type: 'button', class: 'btn small', testid: 'token-prompt', onclick: () => promptToken().then((ok) => ok && poll.now()) }, 'Enter token')], true);
    return;
  }
  const what = e.status === 0 ? `The ${e.message.replace(/^the /, '')}` : `The admin API answered HTTP ${e.status}: ${e.message}`;
  const since = state.lastOk ? ` What is shown is from ${fmtClock(state.lastOk.toISOString())}.` : '';
  showNotice(`${what}. Retrying in ${Math.round(pollDelay() / 1000)} s.${since}`, true);
}

function syncTokenLink() { $('#token-forget').hidden = !hasToken(); }

// ---- search -------------------------------------------------------------------------------

/** An event ID opens its event; anything else is taken for an order number. */
async function runSearch(value) {
  const view = $('#view-search');
  view.replaceChildren(h('div', { class: 'card message' }, 'Looking for ', value, '…'));
  try {
    await api('events/' + seg(value));
    if (currentRoute().value === value) location.replace('#/event/' + seg(value));   // Back skips the search
  } catch (e) {
    if (currentRoute().value !== value) return;
    if (e.status === 404) location.replace('#/order/' + seg(value));
    else view.replaceChildren(h('div', { class: 'card message' }, h('strong', {}, 'Search failed'), e.message));
  }
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

// ---- routing ------------------------------------------------------------------------------

function currentRoute() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, qs] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map((p) => { try { return decodeURIComponent(p); } catch (e) { return p; } });
  const params = new URLSearchParams(qs || '');
  if (['event', 'search', 'order'].includes(parts[0]) && parts[1]) return { view: parts[0], value: parts[1], params };
  if (parts[0] === 'dlq' || parts[0] === 'events') return { view: parts[0], params };
  return { view: 'overview', params };
}

function route() {
  const r = currentRoute();
  for (const v of VIEWS) $('#view-' + v).hidden = v !== r.view;
  const tab = r.view === 'event' || r.view === 'order' || r.view === 'search' ? 'events' : r.view;
  for (const a of document.querySelectorAll('.tabs a[data-view]')) a.classList.toggle('active', a.dataset.view === tab);
  if (r.view !== 'event') leaveEvent();
  if (r.view !== 'order') leaveOrder();
  // The box shows what is being looked at; leaving a search clears it (and nothing else
  // does: what the operator is typing stays).
  const looking = ['search', 'event', 'order'].includes(r.view);
  if (looking) $('#search-input').value = r.value;
  else if (state.looking) $('#search-input').value = '';
  state.looking = looking;
  const titles = { overview: 'Relay console', events: 'Events', dlq: 'Dead letters', event: `Event ${r.value}`,
    order: `Order ${r.value}`, search: `Search ${r.value}` };
  document.title = r.view === 'overview' ? titles.overview : `${titles[r.view]} · Relay`;
  if (r.view === 'event') openEvent(r.value);
  else if (r.view === 'order') openOrder(r.value);
  else if (r.view === 'search') runSearch(r.value);
  else if (r.view === 'events') openEvents(r.params, hub.subscribers);
  else if (r.view === 'dlq') openDlq(r.params, hub.subscribers);
  poll.now();   // charts drawn while hidden have no width; draw them now
  window.scrollTo(0, 0);
}

// ---- polling ------------------------------------------------------------------------------

const pollDelay = () => Math.min(MAX_BACKOFF_MS, POLL_MS * 2 ** Math.min(state.failures, 3));

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
  const header = api('overview').then((o) => { state.failures = 0; state.needsToken = false; renderOverview(o); },
    (e) => { state.failures++; renderOverviewError(e); });
  const jobs = [header];
  if (state.failures > 0) { await header; if (state.failures > 0) return; }   // the API is down: one request per tick
  if (r.view === 'overview') jobs.push(...refreshOverview(r.params));
  else if (!hub.subscribers.length) jobs.push(api('subscribers').then(gotSubscribers, () => {}));
  // An event or an order still in flight is followed live until it settles.
  if (r.view === 'event' && ev.live) jobs.push(openEvent(r.value));
  if (r.view === 'order' && order.live) jobs.push(openOrder(r.value));
  await Promise.allSettled(jobs);
  setSubscriberNames(hub.subscribers.map((s) => s.name));
}

/** The subscriber list, on a page other than the overview: filters and colours need it. */
function gotSubscribers(list) {
  hub.subscribers = list;
  setSubscriberNames(list.map((s) => s.name));
  const r = currentRoute();
  if (r.view === 'dlq') syncDlqSubscribers(r.params, list);
  if (r.view === 'events') syncSubscriberSelect($('#events-filters').elements.subscriber, list.map((s) => s.name), r.params.get('subscriber'));
}

// ---- start --------------------------------------------------------------------------------

function start() {
  if (typeof uPlot === 'undefined') showNotice('The chart library (static/vendor/uPlot.iife.min.js) did not load; charts are off.', true);
  initTokenDialog();
  onToken((what) => {
    syncTokenLink();
    if (what === 'forgotten') toast('Token forgotten: this tab asks for it again.');
    if (what === 'stored' && state.needsToken) poll.now();
  });
  $('#token-forget').addEventListener('click', () => { forgetToken(); poll.now(); });
  syncTokenLink();
  initSearch();
  initOverview();
  initEvents();
  initDlq(() => poll.now());
  window.addEventListener('hashchange', route);
  // The tab of the view already open reloads it (the hash does not change, so no hashchange).
  $('.tabs').addEventListener('click', (e) => { const a = e.target.closest('a[data-view]'); if (a && a.hash === location.hash) route(); });
  document.addEventListener('visibilitychange', () => { if (!document.hidden) poll.now(); });
  setInterval(tickRelative, 1000);
  // The subscribers first (a local round trip): every page's filters and colours use them.
  api('subscribers').then(gotSubscribers, () => {}).finally(route);
}

start();

// Shown for a failure that escaped a page's own handling (a bug): not silently swallowed.
window.addEventListener('unhandledrejection', (e) => {
  if (e.reason instanceof ApiError) { e.preventDefault(); toast(e.reason.message, true); }
});
