/* The order page (#/order/NUMBER): every event of an Ingram order, oldest first, one column
 * per subscriber with its state; for an ordered subscriber, a banner while the order waits
 * (where and why), with the blocking dead letter's replay and purge. */

import { api, seg } from './api.js';
import { $, crumbs, dot, fmtClock, fmtDateTime, fmtInt, h, plural, shortId, stateBadge, toast, utcTitle } from './dom.js';

const LIVE = new Set(['pending', 'retrying', 'waiting']);
const WHY = { retrying: 'retrying', blocked: 'blocked by its dead letter', paused: 'paused', open: 'circuit open' };
export const order = { number: null, key: '', live: false };

export async function openOrder(number) {
  const view = $('#view-order');
  if (order.number !== number) {
    order.number = number;
    order.key = '';
    view.replaceChildren(h('div', { class: 'card message' }, 'Loading order ', number, '…'));
  }
  try {
    const o = await api('orders/' + seg(number));
    if (order.number !== number) return;
    const key = JSON.stringify(o);
    if (key === order.key) return;   // nothing changed
    order.key = key;
    order.live = o.events.some((e) => Object.values(e.states || {}).some((s) => LIVE.has(s)))
      || (o.ordering || []).length > 0;
    view.replaceChildren(crumbs(' · ', h('a', { href: '#/events' + '?order=' + seg(number) }, 'Events of this order')),
      ...(o.ordering || []).map((x) => banner(number, x)), table(o));
  } catch (e) {
    if (order.number !== number) return;
    order.live = false;
    view.replaceChildren(crumbs(), h('div', { class: 'card message' },
      e.status === 404 ? [h('strong', {}, `Nothing found for “${number}”`),
        'No event has that ID and no event carries that order number. An event ID looks like N01CIB9VVFYKR9J6ZW, an order number like 20-RD128. ',
        'If the event never reached the hub, ask the sender to post it again, or send one with ', h('code', {}, 'relay send FILE'), '.']
        : [h('strong', {}, 'Could not load order ' + number), e.message]));
  }
}

export function leaveOrder() { order.number = null; order.live = false; }

/** "crm: waiting behind N01CIB9V…, retrying since 12:03:10 UTC · 3 waiting". */
function banner(number, x) {
  const head = x.headEventId;
  const parts = [h('strong', {}, dot(x.subscriber), x.subscriber), ': waiting behind ',
    head ? h('a', { href: '#/event/' + seg(head), title: head }, shortId(head)) : 'an earlier event',
    ', ', WHY[x.state] || x.state];
  if (x.since) parts.push(' since ', h('span', { title: utcTitle(x.since) }, fmtClock(x.since)));
  if (x.waiting) parts.push(' · ', plural(x.waiting, 'event'), ' waiting');
  const el = h('div', { class: 'banner s-' + x.state, testid: 'ordering-banner', dataset: { subscriber: x.subscriber, state: x.state } },
    h('span', {}, ...parts), h('span', { class: 'spacer' }));
  if (x.state === 'blocked' && head) {
    el.append(
      h('button', { type: 'button', class: 'btn', testid: 'banner-replay', title: `Replay the dead letter of ${head} to ${x.subscriber}; the order moves on once it is delivered`,
        onclick: (e) => act(e.currentTarget, 'replay', x.subscriber, head, number) }, 'Replay the head'),
      h('button', { type: 'button', class: 'btn', testid: 'banner-purge', title: `Delete the dead letter of ${head}; the order moves on without it`,
        onclick: (e) => act(e.currentTarget, 'purge', x.subscriber, head, number) }, 'Purge the head'));
  }
  return el;
}

async function act(btn, what, subscriber, event, number) {
  btn.disabled = true;
  try {
    const r = what === 'replay'
      ? await api('replay', { method: 'POST', body: { subscriber, event, dryRun: false } })
      : await api('dlq', { method: 'DELETE', body: { subscriber, event, dryRun: false } });
    const n = what === 'replay' ? r.replayed : r.deleted;
    toast(n ? `${what === 'replay' ? 'Replayed' : 'Purged'} the dead letter of ${event}` : `No dead letter of ${event} for ${subscriber} any more`, !n);
  } catch (e) {
    toast(`Could not ${what} ${event}: ${e.message}`, true);
  } finally {
    btn.disabled = false;
    if (order.number === number) { order.key = ''; openOrder(number); }
  }
}

function table(o) {
  const names = [...new Set(o.events.flatMap((e) => Object.keys(e.states || {})))];
  const head = h('tr', {}, h('th', {}, 'Received'), h('th', {}, 'Event'), h('th', {}, 'Types'),
    ...names.map((n) => h('th', { class: 'c-sub' }, dot(n), n)));
  const rows = o.events.map((e) => h('tr', { testid: 'order-row', dataset: { event: e.eventId } },
    h('td', { title: utcTitle(e.receivedAt) }, fmtDateTime(e.receivedAt)),
    h('td', {}, h('a', { href: '#/event/' + seg(e.eventId) }, e.eventId)),
    h('td', {}, (e.eventTypes || []).join(', ')),
    ...names.map((n) => h('td', { class: 'c-sub' }, e.states && e.states[n]
      ? stateBadge(e.states[n], { testid: 'order-state', dataset: { subscriber: n } }) : h('span', { class: 'muted', title: 'not for this subscriber' }, '—')))));
  return h('div', { class: 'card', testid: 'order-view', dataset: { order: o.orderNumber } },
    h('div', { class: 'card-head' }, h('h2', {}, `Order ${o.orderNumber}`),
      h('span', { class: 'hint' }, `${plural(o.events.length, 'event')}, oldest first` + (o.more ? ` (the first ${fmtInt(o.events.length)})` : ''))),
    h('div', { class: 'scroll-x' }, h('table', { class: 'grid order' }, h('thead', {}, head), h('tbody', {}, rows))));
}
