/* The events page (#/events?subscriber=&state=&order=&range=&since=&until=): newest first,
 * filtered, paged with the API's cursor (the place of the last event shown, so events that
 * arrive meanwhile neither repeat nor hide one), each row opening its event. */

import { api, query, seg } from './api.js';
import { $, dot, fmtDateTime, h, plural, setText, toast, utcTitle } from './dom.js';

const STATES = ['delivered', 'pending', 'retrying', 'dead', 'paused'];
export const RANGES = { '1h': 3600, '24h': 86400, '7d': 7 * 86400 };
const PAGE = 50;
const list = { filters: {}, next: null, loading: false, shown: 0, token: 0 };

/** The API filters of the current hash: a preset range becomes an absolute `since`. */
export function timeFilters(params) {
  const f = {};
  const range = params.get('range') || '';
  if (RANGES[range]) f.since = new Date(Date.now() - RANGES[range] * 1000).toISOString();
  if (range === 'custom') {
    for (const k of ['since', 'until']) if (params.get(k)) f[k] = new Date(params.get(k)).toISOString();
  }
  return f;
}

export function initEvents() {
  const form = $('#events-filters');
  const go = () => {
    const el = form.elements;
    const custom = el.range.value === 'custom';
    $('.custom-range', form).hidden = !custom;
    const hash = '#/events' + query({ subscriber: el.subscriber.value, state: el.state.value, order: el.order.value.trim(),
      range: el.range.value, since: custom ? el.since.value : '', until: custom ? el.until.value : '' });
    if (location.hash !== hash) location.hash = hash;
  };
  form.addEventListener('change', (e) => { if (e.target.name !== 'order') go(); });
  form.addEventListener('submit', (e) => { e.preventDefault(); go(); });
  form.elements.order.addEventListener('change', go);
  $('#events-more').addEventListener('click', () => load(true));
}

export function openEvents(params, subscribers) {
  syncForm(params, subscribers);
  list.filters = { subscriber: params.get('subscriber') || '', state: params.get('state') || '',
    order: params.get('order') || '', ...timeFilters(params) };
  load(false);
}

/** Keep the subscriber filter's choices in step with the configured subscribers. */
export function syncSubscriberSelect(select, names, wanted) {
  const all = [...names];
  if (wanted && !all.includes(wanted)) all.push(wanted);
  const have = [...select.options].slice(1).map((o) => o.value);
  if (have.join('\n') !== all.join('\n')) {
    select.replaceChildren(h('option', { value: '' }, 'All'), ...all.map((n) => h('option', { value: n }, n)));
  }
  select.value = wanted || '';
}

function syncForm(params, subscribers) {
  const form = $('#events-filters');
  syncSubscriberSelect(form.elements.subscriber, subscribers.map((s) => s.name), params.get('subscriber'));
  form.elements.state.value = STATES.includes(params.get('state')) ? params.get('state') : '';
  form.elements.order.value = params.get('order') || '';
  form.elements.range.value = params.get('range') || '';
  $('.custom-range', form).hidden = form.elements.range.value !== 'custom';
  form.elements.since.value = params.get('since') || '';
  form.elements.until.value = params.get('until') || '';
}

async function load(more) {
  if (more && list.loading) return;
  const token = ++list.token;   // a newer load (the filters changed) wins
  list.loading = true;
  const body = $('#events-body');
  if (!more) list.shown = 0;
  try {
    const r = await api('events' + query({ ...list.filters, limit: PAGE, cursor: more ? list.next : '' }));
    if (token !== list.token) return;
    const events = r.events || [];
    if (!more) body.replaceChildren();
    body.append(...events.map(row));
    list.shown += events.length;
    list.next = r.next;
    $('#events-more').hidden = !r.next;
    setText($('#events-total'), plural(list.shown, 'event') + (r.next ? ' shown, more below' : ''));
    if (!body.children.length) {
      const filtered = Object.values(list.filters).some(Boolean);
      body.append(h('tr', { class: 'empty' }, h('td', { colspan: 5 }, filtered
        ? 'No events match these filters.'
        : ['No events yet. Send one with ', h('code', {}, 'relay send FILE'), '.'])));
    }
  } catch (e) {
    if (token !== list.token) return;
    if (!more) body.replaceChildren(h('tr', { class: 'empty' }, h('td', { colspan: 5 }, 'Could not load events: ' + e.message)));
    else toast('Could not load more: ' + e.message, true);
  } finally {
    if (token === list.token) list.loading = false;
  }
}

function row(e) {
  const href = '#/event/' + seg(e.eventId);
  return h('tr', { testid: 'events-row', class: 'link', dataset: { event: e.eventId },
    onclick: (evt) => { if (!evt.target.closest('a')) location.hash = href; } },
  h('td', { title: utcTitle(e.receivedAt) }, fmtDateTime(e.receivedAt)),
  h('td', {}, h('a', { href }, e.eventId)),
  h('td', {}, (e.eventTypes || []).join(', ')),
  h('td', {}, (e.orderNumbers || []).map((o) => h('a', { class: 'chip', href: '#/order/' + seg(o) }, o))),
  h('td', { class: 'states' }, Object.entries(e.states || {}).map(([sub, st]) => h('span', { class: 'badge mini s-' + st, title: `${sub}: ${st}` }, dot(sub), sub))));
}
