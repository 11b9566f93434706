// Drives chaperone's agent endpoint with Playwright's `connectOverCDP`, the way an agent would.
//
// Env: CHAPERONE_CDP_URL, CHAPERONE_HTTP_URL, SITE_URL, SHOT_PATH, PW_ENDPOINT=cdp|http (default
// cdp), optional STEP_TIMEOUT_MS / TOTAL_TIMEOUT_MS.
// Stdout: exactly one JSON line, `{"ok":true,...}` or `{"ok":false,"step":...,"error":...}`;
// exit code 0 or 1 to match.

import { chromium } from 'playwright-core';
import {
  EXPECTED_TITLE,
  STEP_TIMEOUT_MS,
  checkEqual,
  checkPage,
  fail,
  installGuards,
  pngSize,
  requireEnv,
  step,
  succeed,
} from './common.mjs';

installGuards();

const endpointKind = process.env.PW_ENDPOINT || 'cdp';
if (endpointKind !== 'cdp' && endpointKind !== 'http') {
  fail('config', new Error(`PW_ENDPOINT=${endpointKind}: expected "cdp" or "http"`));
}
// Both URLs are read so a harness that forgets one learns it here, whichever endpoint it tests.
const cdpUrl = requireEnv('CHAPERONE_CDP_URL');
const httpUrl = requireEnv('CHAPERONE_HTTP_URL');
const siteUrl = requireEnv('SITE_URL');
const shotPath = requireEnv('SHOT_PATH');
const endpoint = endpointKind === 'cdp' ? cdpUrl : httpUrl;

// Playwright's own timeouts sit just under ours so that, where it can, Playwright reports the
// hang itself with its call log, which says more than our generic deadline message.
const clientTimeout = Math.max(1, STEP_TIMEOUT_MS - 1_000);

const browser = await step('connect', () =>
  chromium.connectOverCDP(endpoint, { timeout: clientTimeout }),
);

// Agents often reuse the browser's default context instead of creating one; exercise that path
// once too, when the endpoint exposes it.
const defaultContext = browser.contexts()[0];
if (defaultContext) {
  const page = await step('default_context_new_page', () => defaultContext.newPage());
  page.setDefaultTimeout(clientTimeout);
  await step('default_context_goto', () => page.goto(siteUrl, { waitUntil: 'load' }));
  await step('default_context_title', async () => {
    checkEqual('title in the default context', await page.title(), EXPECTED_TITLE);
  });
  await step('default_context_close_page', () => page.close());
}

const context = await step('new_context', () => browser.newContext());
const page = await step('new_page', () => context.newPage());
page.setDefaultTimeout(clientTimeout);
page.setDefaultNavigationTimeout(clientTimeout);

await step('goto', () => page.goto(siteUrl, { waitUntil: 'load' }));
const msg = await step('evaluate_msg', () =>
  page.evaluate("document.querySelector('#msg').textContent"),
);
const sum = await step('evaluate_sum', () => page.evaluate('1+1'));
const title = await step('title', () => page.title());
await step('check_page', () => checkPage({ title, msg, sum }));

await step('screenshot', () => page.screenshot({ path: shotPath, type: 'png' }));
const shotBytes = await step('verify_screenshot', () => pngSize(shotPath));

await step('close_page', () => page.close());
await step('close_context', () => context.close());
await step('close_browser', () => browser.close());

succeed({ title, msg, sum, shot_bytes: shotBytes });
