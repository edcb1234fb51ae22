/* The event page (#/event/ID): the event, then one lane per subscriber with its attempts.
 *
 * Each attempt opens to what was sent (Request: URL and headers) and what came back
 * (Response: status, headers, body), monospace and copyable. Attempts an operator asked for
 * (resend, replay) start a run of their own, and they and breaker probes carry a tag.
 */

import { api, seg } from './api.js';
import { $, copy, crumbs, dot, fmtAge, fmtClock, fmtDateTime, fmtInt, fmtMs, h, plural, rel, stateBadge, toast, utcTitle } from './dom.js';

const LIVE_STATES = new Set(['pending', 'retrying', 'waiting']);
const RUN_TITLES = { resend: 'Sent again by an operator', replay: 'Replayed from the dead letters', again: 'Sent again' };
const TAG_TITLES = { resend: 'an operator sent the event again', replay: 'replayed from the dead letters', probe: "the circuit breaker's probe" };

/** ev.id: the event shown; ev.open: attempts opened ("subscriber#index"), kept across refreshes. */
export const ev = { id: null, key: '', live: false, open: new Set() };

export async function openEvent(id) {
  const view = $('#view-event');
  if (ev.id !== id) {
    ev.id = id;
    ev.key = '';
    ev.open = new Set();
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

export function leaveEvent() { ev.id = null; ev.live = false; }

function renderEventPage(view, e) {
  const orders = (e.orderNumbers || []).length
    ? e.orderNumbers.map((o) => h('a', { class: 'chip', href: '#/order/' + seg(o), title: 'Every event of order ' + o }, o))
    : h('span', { class: 'muted' }, 'none');
  const head = h('div', { class: 'card' },
    h('dl', { class: 'event-head' },
      h('dt', {}, 'Event'), h('dd', { class: 'event-id' }, e.eventId),
      h('dt', {}, 'Received'), h('dd', { title: utcTitle(e.receivedAt) }, fmtDateTime(e.receivedAt), ' ', e.receivedAt ? rel(e.receivedAt) : null),
      h('dt', {}, 'Topic'), h('dd', {}, e.topic || '—'),
      h('dt', {}, 'Event types'), h('dd', {}, (e.eventTypes || []).map((t) => h('span', { class: 'chip' }, t))),
      h('dt', {}, 'Orders'), h('dd', {}, orders)),
    h('div', { class: 'verdict', id: 'verdict' }));
  view.replaceChildren(crumbs(' · ', h('a', { href: '#/events' }, 'Events')), head, renderBody(e), h('div', { class: 'lanes', id: 'lanes' }));
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
  if (key === ev.key) return;   // nothing changed: leave the DOM (and the reader) alone
  ev.key = key;
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
  const parts = ['delivered', 'retrying', 'waiting', 'pending', 'paused', 'dead'].filter((s) => counts[s])
    .map((s) => h('span', { class: 'badge mini s-' + s }, `${counts[s]} ${s}`));
  $('#verdict').replaceChildren(
    h('strong', {}, `Delivered to ${counts.delivered || 0} of ${plural(deliveries.length, 'subscriber')}`), ...parts);
}

function renderLane(e, d) {
  const detail = [];
  if (d.state === 'retrying' && d.nextAttemptAt) {
    const at = d.nextAttemptAt;
    detail.push(h('span', { class: 'detail warn', title: utcTitle(at) }, 'next attempt ', fmtClock(at), ' (', rel(at), ')'));
  } else if (d.state === 'waiting') {
    detail.push(h('span', { class: 'detail', testid: 'waiting-for' }, 'waiting for ',
      d.waitingFor ? h('a', { href: '#/event/' + seg(d.waitingFor) }, d.waitingFor) : 'an earlier event',
      ' (delivered in order)'));
  } else if (d.state === 'dead') {
    detail.push(h('span', { class: 'detail bad' }, d.deadReason || 'dead'));
  } else if (d.state === 'paused') {
    detail.push(h('span', { class: 'detail' }, 'subscriber paused; delivery waits'));
  } else if (d.state === 'pending') {
    detail.push(h('span', { class: 'detail' }, 'queued for a worker'));
  }
  if (d.configured === false) detail.push(h('span', { class: 'detail' }, '· subscriber no longer configured'));
  const head = h('div', { class: 'card-head' },
    h('h2', {}, dot(d.subscriber), d.subscriber), stateBadge(d.state), ...detail, h('span', { class: 'spacer' }));
  if (d.state === 'dead' || d.state === 'delivered') head.append(resendButton(e, d));
  const attempts = d.attempts || [];
  const body = attempts.length ? attemptsTable(e, d, attempts)
    : h('div', { class: 'none' }, d.state === 'dead' ? 'No attempt was made.' : 'No attempts yet.');
  return h('div', { class: 'card lane', testid: 'event-lane', dataset: { subscriber: d.subscriber, state: d.state } }, head, body);
}

function resendButton(e, d) {
  const why = e.bodyExpired ? 'the stored body has expired' : d.configured === false ? 'the subscriber is no longer configured' : '';
  const dead = d.state === 'dead';
  return h('button', {
    type: 'button', class: 'btn', testid: 'resend-button', disabled: !!why,
    title: why ? 'Cannot send again: ' + why : `Deliver this event to ${d.subscriber} again, with fresh attempts`,
    onclick: (ev2) => resend(ev2.currentTarget, e.eventId, d.subscriber),
  }, dead ? 'Replay to this subscriber' : 'Send again');
}

async function resend(btn, id, subscriber) {
  btn.disabled = true;
  try {
    const r = await api(`events/${seg(id)}/resend`, { method: 'POST', body: { subscriber } });
    toast(`Queued ${fmtInt(r.queued)} delivery to ${subscriber}`);
    setTimeout(() => { if (ev.id === id) openEvent(id); }, 800);
  } catch (err) {
    btn.disabled = false;
    toast(`Sending to ${subscriber} failed: ${err.message}`, true);
  }
}

/** Attempts in runs: a resend or a replay (or, in records older than triggers, an attempt
 * number that starts again) begins a new run, under a heading; numbers are never changed. */
function runs(attempts) {
  const out = [];
  attempts.forEach((a, i) => {
    const prev = attempts[i - 1];
    const manual = a.trigger === 'resend' || a.trigger === 'replay';
    const restarted = prev && a.trigger !== 'probe' && a.attempt <= prev.attempt && a.attempt === 1;
    if (!out.length || manual || restarted) out.push({ trigger: manual ? a.trigger : (out.length ? 'again' : null), at: a.at, items: [] });
    out[out.length - 1].items.push([a, i]);
  });
  return out;
}

const firstLine = (text) => (text || '').split('\n').map((x) => x.trim()).find(Boolean) || '';

function attemptsTable(e, d, attempts) {
  const t0 = new Date(e.receivedAt).getTime();
  const body = [];
  for (const run of runs(attempts)) {
    if (run.trigger) {
      body.push(h('tr', { class: 'run-head', testid: 'run-head', dataset: { trigger: run.trigger } },
        h('td', { colspan: 5 }, RUN_TITLES[run.trigger], ' · ', h('span', { title: utcTitle(run.at) }, fmtDateTime(run.at)))));
    }
    for (const [a, i] of run.items) {
      const key = `${d.subscriber}#${i}`;
      const ok = a.status !== null && a.status >= 200 && a.status < 300;
      const delta = (new Date(a.at).getTime() - t0) / 1000;
      const answer = a.error || (!ok && a.response ? firstLine(a.response.body) : '');
      const detail = h('tr', { class: 'attempt-detail', testid: 'attempt-detail', hidden: !ev.open.has(key) },
        h('td', { colspan: 5 }, ev.open.has(key) ? attemptDetail(a) : null));
      const toggle = () => {
        const opening = detail.hidden;
        if (opening) { ev.open.add(key); if (!detail.firstChild.firstChild) detail.firstChild.append(attemptDetail(a)); } else ev.open.delete(key);
        detail.hidden = !opening;
        row.classList.toggle('open', opening);
        row.setAttribute('aria-expanded', String(opening));
      };
      const tag = a.trigger && a.trigger !== 'auto'
        ? h('span', { class: 'tag t-' + a.trigger, testid: 'attempt-tag', title: TAG_TITLES[a.trigger] }, a.trigger) : null;
      const row = h('tr', {
        testid: 'attempt-row', class: 'attempt' + (ev.open.has(key) ? ' open' : ''), tabindex: 0, role: 'button',
        'aria-expanded': String(ev.open.has(key)), title: 'Show the request and the response',
        dataset: { attempt: a.attempt, trigger: a.trigger || 'auto' },
        onclick: (evt) => { if (!evt.target.closest('a, button, .pane')) toggle(); },
        onkeydown: (evt) => { if (evt.key === 'Enter' || evt.key === ' ') { evt.preventDefault(); toggle(); } },
      },
      h('td', { class: 'c-n' }, h('span', { class: 'caret' }), a.attempt),
      h('td', { class: 'c-time', title: utcTitle(a.at) }, fmtClock(a.at, true),
        Number.isFinite(delta) ? h('span', { class: 'delta' }, '+' + fmtAge(delta)) : null),
      h('td', { class: 'c-status ' + (ok ? 'st-ok' : 'st-bad') }, a.status === null ? 'no answer' : a.status, tag),
      h('td', { class: 'num c-lat' }, fmtMs(a.latencyMs)),
      h('td', { class: 'c-error', title: answer || null }, answer));
      body.push(row, detail);
    }
  }
  return h('table', { class: 'grid attempts' },
    h('thead', {}, h('tr', {}, h('th', { class: 'c-n' }, '#'), h('th', { class: 'c-time' }, 'Time'), h('th', { class: 'c-status' }, 'Status'),
      h('th', { class: 'num c-lat' }, 'Latency'), h('th', { class: 'c-error' }, 'Error or answer'))),
    h('tbody', {}, body));
}

const headerLines = (headers) => Object.entries(headers || {}).map(([k, v]) => `${k}: ${v}`).join('\n');

function pane(title, testid, copyText, ...content) {
  const el = h('div', { class: 'pane', testid });
  const btn = h('button', { type: 'button', class: 'btn small copy', testid: 'copy-' + testid.replace('-pane', ''),
    onclick: () => copy(copyText, el.querySelector('pre')) }, 'Copy');
  el.append(h('div', { class: 'pane-head' }, h('h3', {}, title), h('span', { class: 'spacer' }), btn),
    ...content.filter((c) => c !== null && c !== undefined));
  return el;
}

/** A JSON body (whole, not truncated) indented; any other body as it came. */
function readable(res) {
  const type = Object.entries(res.headers || {}).find(([k]) => k.toLowerCase() === 'content-type');
  if (!res.truncated && type && /json/i.test(type[1])) {
    try { return JSON.stringify(JSON.parse(res.body), null, 2); } catch (e) { /* not JSON after all */ }
  }
  return res.body;
}

/** The two panes of an attempt: what was sent, what came back. */
function attemptDetail(a) {
  const req = a.request;
  const request = req
    ? pane('Request', 'request-pane', `POST ${req.url}\n${headerLines(req.headers)}`,
      h('pre', { class: 'mono', testid: 'request-head' }, `POST ${req.url}\n${headerLines(req.headers)}`),
      h('p', { class: 'hint' }, 'Body: the event’s body, as received (above). Credentials are shown as ***.'))
    : pane('Request', 'request-pane', '', h('p', { class: 'hint' }, 'Not kept for this attempt (recorded before requests were kept).'));
  const res = a.response;
  let response;
  if (!res) {
    response = pane('Response', 'response-pane', a.error || '',
      h('p', { class: 'no-answer', testid: 'no-answer' }, 'No response: ', a.error || 'nothing came back'));
  } else {
    const text = `HTTP ${res.status}\n${headerLines(res.headers)}` + (res.body !== null ? '\n\n' + res.body : '');
    response = pane('Response', 'response-pane', text,
      h('pre', { class: 'mono', testid: 'response-head' }, `HTTP ${res.status}\n${headerLines(res.headers)}`),
      res.body === null || res.body === undefined
        ? h('p', { class: 'hint' }, 'Body not kept for a 2xx answer.')
        : h('pre', { class: 'mono body', testid: 'response-body' }, readable(res) || '(empty)'),
      res.truncated ? h('p', { class: 'hint', testid: 'truncated' }, 'Truncated at 4 KiB: the rest of the body was not read.') : null);
  }
  return h('div', { class: 'panes' }, request, response);
}
