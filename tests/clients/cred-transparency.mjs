// What an agent does with its own cookies and headers through Playwright: `addCookies`,
// `setExtraHTTPHeaders`, `route()` (fulfil and continue with a header), `document.cookie`,
// localStorage, `cookies()` and `storageState()`. chaperone's transparency test runs this
// against bare Chromium and against a chaperone session without credentials and compares the
// two verdicts: with nothing held, nothing may differ.
//
// Env: CDP_URL, SITE_URL (a site whose `/echo` reflects request headers into `#h`), optional
// STEP_TIMEOUT_MS / TOTAL_TIMEOUT_MS. Stdout: exactly one JSON line (see common.mjs).

import { chromium } from 'playwright-core';
import { STEP_TIMEOUT_MS, installGuards, requireEnv, step, succeed } from './common.mjs';

installGuards();

const cdpUrl = requireEnv('CDP_URL');
const site = requireEnv('SITE_URL');
const host = new URL(site).hostname;
const clientTimeout = Math.max(1, STEP_TIMEOUT_MS - 1_000);

// Only what the agent controls; the rest of the reflected headers (User-Agent, Accept…) is the
// browser's business and not part of this comparison.
const AGENT_HEADERS = ['cookie', 'authorization', 'x-agent', 'x-routed'];

const browser = await step('connect', () =>
  chromium.connectOverCDP(cdpUrl, { timeout: clientTimeout }),
);
const context = await step('new_context', () => browser.newContext());
await step('add_cookies', () =>
  context.addCookies([
    { name: 'pref', value: 'blue', domain: host, path: '/' },
    { name: 'agent_session', value: 'agent-own-session', domain: host, path: '/', httpOnly: true },
  ]),
);
const page = await step('new_page', () => context.newPage());
page.setDefaultTimeout(clientTimeout);
page.setDefaultNavigationTimeout(clientTimeout);
await step('extra_headers', () =>
  page.setExtraHTTPHeaders({ 'x-agent': 'agent-1', authorization: 'Bearer agent-own-token' }),
);
await step('route', async () => {
  await page.route('**/routed', (r) =>
    r.fulfill({ status: 200, contentType: 'text/html', body: '<p id=msg>from route</p>' }),
  );
  await page.route('**/echo', (r) =>
    r.continue({ headers: { ...r.request().headers(), 'x-routed': 'yes' } }),
  );
});

await step('goto_routed', () => page.goto(`${site}/routed`));
const routed = await step('routed_text', () => page.textContent('#msg'));
await step('goto_echo', () => page.goto(`${site}/echo`));
const echo = await step('echo_text', () => page.textContent('#h'));
const sent = echo
  .split('\n')
  .filter((l) => AGENT_HEADERS.some((h) => l.startsWith(`${h}:`)))
  .sort();
const scriptView = await step('script_cookie_and_storage', () =>
  page.evaluate(() => {
    document.cookie = 'js=1; path=/';
    localStorage.setItem('k', 'v');
    return { cookie: document.cookie, local: localStorage.getItem('k') };
  }),
);
const byName = (a, b) => a.name.localeCompare(b.name);
const cookies = await step('cookies', async () => (await context.cookies()).sort(byName));
const state = await step('storage_state', async () => {
  const s = await context.storageState();
  return { cookies: s.cookies.sort(byName), origins: s.origins };
});

await step('close_context', () => context.close());
await step('close_browser', () => browser.close());
succeed({ observed: { routed, sent, scriptView, cookies, state } });
