/* The overview's "Ordered delivery" card: per subscriber with `ordering`, how many events wait
 * and which keys hold them back (GET /api/ordering/{subscriber}), oldest first, each with its
 * head event and why it has not gone. Hidden while no subscriber is ordered. */

import { api, seg } from './api.js';
import { $, dot, fmtClock, fmtInt, h, plural, shortId, utcTitle } from './dom.js';

const WHY = { retrying: 'retrying', blocked: 'blocked by its dead letter', paused: 'paused', open: 'circuit open' };
const SHOWN = 10;   // keys listed per subscriber; the count says how many more wait

/** Redraw the card from the subscribers list (already fetched) and each one's keys. */
export async function renderOrdering(subscribers) {
  const card = $('#ordering-card');
  const ordered = subscribers.filter((s) => s.ordering);
  card.hidden = !ordered.length;
  if (!ordered.length) return;
  const lists = await Promise.all(ordered.map((s) => api(`ordering/${seg(s.name)}?limit=${SHOWN}`)
    .then((r) => r.keys, () => null)));
  const body = ordered.map((s, i) => section(s, lists[i]));
  $('#ordering-body').replaceChildren(...body);
}

function section(s, keys) {
  const o = s.ordering;
  const head = h('div', { class: 'ordering-head', testid: 'ordering-subscriber', dataset: { name: s.name } },
    h('strong', {}, dot(s.name), s.name),
    h('span', { class: 'muted' }, ` by ${o.by}, on_dead ${o.onDead} · `),
    h('span', { testid: 'ordering-waiting' }, plural(o.waiting, 'event'), ' waiting'),
    h('span', { class: 'muted' }, ' · '),
    h('span', { testid: 'ordering-blocked', class: o.blockedKeys ? 'bad' : '' }, plural(o.blockedKeys, 'key'), ' blocked'));
  if (keys === null) return h('div', { class: 'ordering' }, head, h('p', { class: 'muted' }, 'Could not load its keys.'));
  if (!keys.length) return h('div', { class: 'ordering' }, head, h('p', { class: 'muted' }, 'No key holds events back.'));
  const rows = keys.map((k) => h('tr', { testid: 'ordering-key', dataset: { key: k.key, state: k.state } },
    h('td', {}, o.by === 'order' ? h('a', { href: '#/order/' + seg(k.key), title: 'The order’s whole story' }, k.key) : k.key),
    h('td', {}, h('a', { href: '#/event/' + seg(k.headEventId), title: k.headEventId }, shortId(k.headEventId))),
    h('td', {}, h('span', { class: 'badge s-' + (k.state === 'blocked' ? 'open' : k.state === 'retrying' ? 'half-open' : k.state) }, WHY[k.state] || k.state)),
    h('td', { title: utcTitle(k.since) }, fmtClock(k.since)),
    h('td', { class: 'num' }, fmtInt(k.waiting))));
  return h('div', { class: 'ordering' }, head, h('table', { class: 'grid' },
    h('thead', {}, h('tr', {}, h('th', {}, o.by === 'order' ? 'Order' : 'Topic'), h('th', {}, 'First in line'),
      h('th', {}, 'Why it waits'), h('th', {}, 'Since'), h('th', { class: 'num' }, 'Waiting'))),
    h('tbody', {}, ...rows)));
}
