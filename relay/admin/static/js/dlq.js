/* The dead letters page (#/dlq?subscriber=&range=&since=&until=): filters, per-row replay
 * and delete, several selected at once, and replay or purge of everything matching the
 * filters behind a dry-run count. */

import { api, query, seg } from './api.js';
import { $, dot, fmtDateTime, fmtInt, h, plural, setText, toast, utcTitle } from './dom.js';
import { syncSubscriberSelect, timeFilters } from './events.js';

/** Dead letters tried per replay step: the bar moves between steps. */
const REPLAY_STEP = 200;
const dlq = { filters: {}, next: null, loading: false, busy: false, selected: new Map(), token: 0, after: null };
const keyOf = (sub, id) => sub + '\n' + id;

export function initDlq(onChange) {
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
  $('#dlq-more').addEventListener('click', () => load(true));
  $('#dlq-replay').addEventListener('click', replayDryRun);
  $('#dlq-purge').addEventListener('click', purgeDryRun);
  $('#dlq-replay-selected').addEventListener('click', replaySelected);
  $('#dlq-delete-selected').addEventListener('click', deleteSelectedAsk);
  $('#replay-cancel').addEventListener('click', () => { if (!dlq.busy) $('#replay-panel').hidden = true; });
  $('#dlq-select-all').addEventListener('change', (e) => {
    for (const box of document.querySelectorAll('#dlq-body input[type=checkbox]')) {
      box.checked = e.target.checked;
      select(box.dataset.subscriber, box.dataset.event, box.checked);
    }
    syncSelection();
  });
  dlq.onChange = onChange;
}

export function openDlq(params, subscribers) {
  const form = $('#dlq-filters');
  syncSubscriberSelect(form.elements.subscriber, subscribers.map((s) => s.name), params.get('subscriber'));
  form.elements.range.value = params.get('range') || '';
  $('.custom-range', form).hidden = form.elements.range.value !== 'custom';
  form.elements.since.value = params.get('since') || '';
  form.elements.until.value = params.get('until') || '';
  const filters = { subscriber: params.get('subscriber') || '', ...timeFilters(params) };
  if (JSON.stringify(filters) !== JSON.stringify(dlq.filters)) dlq.selected.clear();
  dlq.filters = filters;
  if (!dlq.busy) $('#replay-panel').hidden = true;
  load(false);
}

/** Keep the subscriber filter in step when the subscriber list arrives after the page. */
export function syncDlqSubscribers(params, subscribers) {
  syncSubscriberSelect($('#dlq-filters').elements.subscriber, subscribers.map((s) => s.name), params.get('subscriber'));
}

async function load(more) {
  if (more && dlq.loading) return;
  const token = ++dlq.token;
  dlq.loading = true;
  const body = $('#dlq-body');
  try {
    const r = await api('dlq' + query({ ...dlq.filters, limit: 50, cursor: more ? dlq.next : '' }));
    if (token !== dlq.token) return;
    const letters = r.deadLetters || [];
    if (!more) body.replaceChildren();
    body.append(...letters.map(row));
    dlq.next = r.next;
    $('#dlq-more').hidden = !r.next;
    setText($('#dlq-total'), plural(r.total, 'dead letter'));
    $('#dlq-replay').disabled = !r.total || dlq.busy;
    $('#dlq-purge').disabled = !r.total || dlq.busy;
    if (!body.children.length) {
      const filtered = dlq.filters.subscriber || dlq.filters.since || dlq.filters.until;
      body.append(h('tr', { class: 'empty' }, h('td', { colspan: 9 }, filtered
        ? 'No dead letters match these filters.'
        : 'No dead letters. Deliveries that fail every attempt land here, to be replayed once the subscriber is fixed.')));
    }
    // What is selected but no longer listed (replayed, deleted, expired) is no longer selected.
    const listed = new Set([...body.querySelectorAll('input[type=checkbox]')].map((b) => keyOf(b.dataset.subscriber, b.dataset.event)));
    if (!more) for (const k of [...dlq.selected.keys()]) if (!listed.has(k)) dlq.selected.delete(k);
    syncSelection();
  } catch (e) {
    if (token !== dlq.token) return;
    if (!more) body.replaceChildren(h('tr', { class: 'empty' }, h('td', { colspan: 9 }, 'Could not load dead letters: ' + e.message)));
    else toast('Could not load more: ' + e.message, true);
  } finally {
    if (token === dlq.token) dlq.loading = false;
  }
}

function select(subscriber, event, on) {
  if (on) dlq.selected.set(keyOf(subscriber, event), { subscriber, event });
  else dlq.selected.delete(keyOf(subscriber, event));
}

function syncSelection() {
  const n = dlq.selected.size;
  setText($('#dlq-replay-selected'), `Replay selected (${fmtInt(n)})`);
  setText($('#dlq-delete-selected'), `Delete selected (${fmtInt(n)})`);
  $('#dlq-replay-selected').disabled = !n || dlq.busy;
  $('#dlq-delete-selected').disabled = !n || dlq.busy;
  const boxes = [...document.querySelectorAll('#dlq-body input[type=checkbox]')];
  const all = $('#dlq-select-all');
  all.checked = boxes.length > 0 && boxes.every((b) => b.checked);
  all.indeterminate = !all.checked && boxes.some((b) => b.checked);
}

function row(d) {
  const box = h('input', { type: 'checkbox', testid: 'dlq-select', 'aria-label': `Select ${d.eventId} for ${d.subscriber}`,
    dataset: { subscriber: d.subscriber, event: d.eventId },
    onchange: (e) => { select(d.subscriber, d.eventId, e.target.checked); syncSelection(); } });
  box.checked = dlq.selected.has(keyOf(d.subscriber, d.eventId));
  return h('tr', { testid: 'dlq-row', dataset: { event: d.eventId, subscriber: d.subscriber } },
    h('td', { class: 'c-check' }, box),
    h('td', { title: utcTitle(d.deadAt) }, fmtDateTime(d.deadAt)),
    h('td', {}, dot(d.subscriber), d.subscriber, d.configured === false ? h('span', { class: 'muted' }, ' (removed)') : null),
    h('td', {}, h('a', { href: '#/event/' + seg(d.eventId) }, d.eventId)),
    h('td', {}, (d.orderNumbers || []).map((o) => h('a', { class: 'chip', href: '#/order/' + seg(o) }, o))),
    h('td', { class: 'num' }, fmtInt(d.attempts)),
    h('td', {}, d.reason || '—'),
    h('td', { class: 'c-error', title: d.lastError || null }, d.lastError || '—'),
    h('td', { class: 'c-actions' },
      h('button', { type: 'button', class: 'btn small', testid: 'dlq-row-replay', disabled: d.configured === false,
        title: d.configured === false ? 'The subscriber is no longer configured' : `Deliver ${d.eventId} to ${d.subscriber} again`,
        onclick: (e) => replayOne(e.currentTarget, d) }, 'Replay'),
      h('button', { type: 'button', class: 'btn small', testid: 'dlq-row-delete', title: 'Delete this dead letter',
        onclick: () => deleteAsk([{ subscriber: d.subscriber, event: d.eventId }]) }, 'Delete')));
}

// ---- the action panel: a question, a confirm button, then progress -----------------------

function panel(text, mode = '', confirm = null) {
  const p = $('#replay-panel');
  p.hidden = false;
  p.className = 'replay-panel' + (mode ? ' ' + mode : '');
  setText($('#replay-text'), text);
  const btn = $('#replay-confirm');
  btn.hidden = !confirm;
  if (confirm) {
    setText(btn, confirm.label);
    btn.dataset.testid = confirm.testid;
    btn.onclick = confirm.run;
  }
  $('#replay-cancel').hidden = dlq.busy;
  setText($('#replay-cancel'), confirm ? 'Cancel' : 'Close');
  if (!dlq.busy) $('#replay-progress').hidden = true;
}

function progress(done, total) {
  const bar = $('#replay-progress');
  bar.hidden = false;
  bar.max = Math.max(1, total);
  bar.value = done;
}

/** Run `work` with the page's buttons off, then reload the list and the header figures. */
async function busy(work) {
  dlq.busy = true;
  for (const id of ['#dlq-replay', '#dlq-purge']) $(id).disabled = true;
  syncSelection();
  $('#replay-confirm').hidden = true;
  $('#replay-cancel').hidden = true;
  try {
    await work();
  } finally {
    dlq.busy = false;
    $('#replay-cancel').hidden = false;
    setText($('#replay-cancel'), 'Close');
    load(false);
    if (dlq.onChange) dlq.onChange();
  }
}

const filtersBody = () => Object.fromEntries(Object.entries(dlq.filters).filter(([, v]) => v));
const couldNot = (n) => `${fmtInt(n)} could not be replayed (their event has expired)`;

/** Replay everything matching the filters: the dry run's count first, then in steps. */
async function replayDryRun() {
  const filters = filtersBody();
  try {
    const r = await api('replay', { method: 'POST', body: { ...filters, dryRun: true } });
    const n = r.remaining;
    panel(n ? `${plural(n, 'dead letter')} match${n === 1 ? 'es' : ''}; replay ${n === 1 ? 'it' : 'them'}?`
      : 'No dead letters match these filters.', '',
    n ? { label: `Replay ${fmtInt(n)}`, testid: 'replay-confirm', run: () => replayAll(filters, n) } : null);
  } catch (e) {
    panel('Could not count dead letters: ' + e.message, 'failed');
  }
}

/** Step by step, each starting where the last ended (`after`): letters that cannot be
 * replayed are passed once, and the replay goes on to those behind them. */
function replayAll(filters, total) {
  return busy(async () => {
    let replayed = 0;
    let failed = 0;
    let after = null;
    progress(0, total);
    try {
      for (;;) {
        const r = await api('replay', { method: 'POST', body: { ...filters, dryRun: false, limit: REPLAY_STEP, ...(after ? { after } : {}) } });
        replayed += r.replayed;
        failed += r.failed || 0;
        progress(replayed + failed, replayed + failed + r.remaining);
        panel(`Replaying… ${fmtInt(replayed + failed)} of ${fmtInt(replayed + failed + r.remaining)}`);
        after = r.next;
        if (!after) break;
      }
      panel(`Replayed ${plural(replayed, 'dead letter')}` + (failed ? `; ${couldNot(failed)}.` : '.'), failed ? 'failed' : 'done');
    } catch (e) {
      panel(`Replay stopped after ${fmtInt(replayed)}: ${e.message}`, 'failed');
    }
  });
}

async function replayOne(btn, d) {
  btn.disabled = true;
  try {
    const r = await api('replay', { method: 'POST', body: { subscriber: d.subscriber, event: d.eventId, dryRun: false } });
    if (r.replayed) toast(`Replayed ${d.eventId} to ${d.subscriber}`);
    else toast(r.failed ? `${d.eventId} cannot be replayed: its event has expired` : `No dead letter of ${d.eventId} any more`, true);
  } catch (e) {
    toast(`Could not replay ${d.eventId}: ${e.message}`, true);
  } finally {
    load(false);
    if (dlq.onChange) dlq.onChange();
  }
}

function replaySelected() {
  const chosen = [...dlq.selected.values()];
  return busy(async () => {
    let replayed = 0;
    let failed = 0;
    progress(0, chosen.length);
    try {
      for (const { subscriber, event } of chosen) {
        const r = await api('replay', { method: 'POST', body: { subscriber, event, dryRun: false } });
        replayed += r.replayed;
        failed += r.failed || 0;
        progress(replayed + failed, chosen.length);
        panel(`Replaying… ${fmtInt(replayed + failed)} of ${fmtInt(chosen.length)}`);
      }
      dlq.selected.clear();
      panel(`Replayed ${plural(replayed, 'dead letter')}` + (failed ? `; ${couldNot(failed)}.` : '.'), failed ? 'failed' : 'done');
    } catch (e) {
      panel(`Replay stopped after ${fmtInt(replayed)}: ${e.message}`, 'failed');
    }
  });
}

function deleteSelectedAsk() { deleteAsk([...dlq.selected.values()]); }

/** Deleting cannot be undone: ask first. */
function deleteAsk(letters) {
  if (!letters.length) return;
  const what = letters.length === 1 ? `the dead letter of ${letters[0].event} for ${letters[0].subscriber}` : plural(letters.length, 'dead letter');
  panel(`Delete ${what}? This cannot be undone.`, 'warn',
    { label: `Delete ${fmtInt(letters.length)}`, testid: 'delete-confirm', run: () => deleteLetters(letters) });
}

function deleteLetters(letters) {
  return busy(async () => {
    let deleted = 0;
    progress(0, letters.length);
    try {
      for (const [i, { subscriber, event }] of letters.entries()) {
        const r = await api('dlq', { method: 'DELETE', body: { subscriber, event, dryRun: false } });
        deleted += r.deleted;
        dlq.selected.delete(keyOf(subscriber, event));
        progress(i + 1, letters.length);
      }
      panel(`Deleted ${plural(deleted, 'dead letter')}.`, 'done');
    } catch (e) {
      panel(`Delete stopped after ${fmtInt(deleted)}: ${e.message}`, 'failed');
    }
  });
}

/** Purge everything matching the filters: the dry run's count first. */
async function purgeDryRun() {
  const filters = filtersBody();
  try {
    const r = await api('dlq', { method: 'DELETE', body: { ...filters, dryRun: true } });
    const n = r.matched;
    panel(n ? `${plural(n, 'dead letter')} match${n === 1 ? 'es' : ''}; delete ${n === 1 ? 'it' : 'them'}? This cannot be undone.`
      : 'No dead letters match these filters.', n ? 'warn' : '',
    n ? { label: `Delete ${fmtInt(n)}`, testid: 'purge-confirm', run: () => purge(filters) } : null);
  } catch (e) {
    panel('Could not count dead letters: ' + e.message, 'failed');
  }
}

function purge(filters) {
  return busy(async () => {
    try {
      const r = await api('dlq', { method: 'DELETE', body: { ...filters, dryRun: false } });
      dlq.selected.clear();
      panel(`Deleted ${plural(r.deleted, 'dead letter')}.`, 'done');
    } catch (e) {
      panel('Purge failed: ' + e.message, 'failed');
    }
  });
}
