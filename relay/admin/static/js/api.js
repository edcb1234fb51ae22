/* The admin API client (docs/admin-api.md): relative URLs (api/...), so the console works
 * behind a path prefix; the admin token kept for this browser tab (sessionStorage), asked
 * for on a 401 by a dialog the operator may dismiss, and forgotten on request.
 */

import { $ } from './dom.js';

const GET_TIMEOUT_MS = 10000;   // a poll that hangs longer counts as the API being down
const POST_TIMEOUT_MS = 60000;  // a replay step may take a while on a big dead-letter set
const TOKEN_KEY = 'relay.adminToken';

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** Listeners told when the token is needed and was not given, or changes. */
const tokenListeners = new Set();
export const onToken = (fn) => tokenListeners.add(fn);
const tell = (what) => tokenListeners.forEach((fn) => fn(what));

export const hasToken = () => !!sessionStorage.getItem(TOKEN_KEY);

/** fetch api/<path> as JSON with the tab's token; a 401 asks for a token and retries. */
export async function api(path, { method = 'GET', body, timeout = method === 'GET' ? GET_TIMEOUT_MS : POST_TIMEOUT_MS } = {}) {
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
      if (sessionStorage.getItem(TOKEN_KEY) === token) {
        const given = await askToken(token ? 'That token was refused.' : '');
        if (!given) throw new ApiError(401, 'the admin token is needed');
      }
      continue;
    }
    let data = null;
    try { data = await res.json(); } catch (e) { /* an empty or non-JSON answer */ }
    if (!res.ok) throw new ApiError(res.status, (data && data.error) || `HTTP ${res.status}`);
    return data;
  }
}

export const query = (params) => {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== '' && v !== null && v !== undefined) q.set(k, v);
  const s = q.toString();
  return s ? '?' + s : '';
};
export const seg = encodeURIComponent;

// ---- the token dialog ---------------------------------------------------------------------

// One dialog for every request waiting on a 401: they all resume (true) when a token is
// stored, or give up (false) when the operator dismisses it.
let waiters = null;
let dismissed = false;

/** Ask for the token; resolves true once one is stored, false if the dialog is dismissed. */
export function askToken(error = '', force = false) {
  const dlg = $('#token-dialog');
  const err = $('#token-error');
  err.textContent = error;
  err.hidden = !error;
  // Dismissed once: polls do not reopen the dialog every few seconds; the notice's button
  // (or a refused action) does.
  if (dismissed && !force && !waiters) return Promise.resolve(false);
  if (!waiters) {
    waiters = [];
    $('#token-input').value = '';
    if (!dlg.open) dlg.showModal();
    $('#token-input').focus();
  }
  return new Promise((resolve) => waiters.push(resolve));
}

function settle(given) {
  const waiting = waiters || [];
  waiters = null;
  waiting.forEach((resolve) => resolve(given));
}

export function initTokenDialog() {
  const dlg = $('#token-dialog');
  $('#token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const value = $('#token-input').value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    dismissed = false;
    dlg.close();
    settle(true);
    tell('stored');
  });
  const dismiss = () => {
    dismissed = true;
    if (dlg.open) dlg.close();
    settle(false);
    tell('dismissed');
  };
  $('#token-cancel').addEventListener('click', dismiss);
  dlg.addEventListener('cancel', (e) => { e.preventDefault(); dismiss(); });   // Escape
}

/** Forget the tab's token: the next API call asks again. */
export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  dismissed = false;
  tell('forgotten');
}

/** Open the dialog again after it was dismissed (the notice's "Enter token"). */
export function promptToken() {
  dismissed = false;
  return askToken('', true);
}
