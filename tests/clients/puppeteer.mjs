// Drives chaperone's agent endpoint with Puppeteer's `connect({browserWSEndpoint})`, the way an
// agent would.
//
// Env: CHAPERONE_CDP_URL, SITE_URL, SHOT_PATH, optional STEP_TIMEOUT_MS / TOTAL_TIMEOUT_MS.
// CHAPERONE_HTTP_URL is not used: Puppeteer's `browserURL` resolves `/json/version` from the
// server root and drops chaperone's `/session/<capability>` prefix, so agents use the ws URL.
// Stdout: exactly one JSON line, `{"ok":true,...}` or `{"ok":false,"step":...,"error":...}`;
// exit code 0 or 1 to match.

import puppeteer from 'puppeteer-core';
import {
  STEP_TIMEOUT_MS,
  checkPage,
  installGuards,
  pngSize,
  requireEnv,
  step,
  succeed,
} from './common.mjs';

installGuards();

const cdpUrl = requireEnv('CHAPERONE_CDP_URL');
const siteUrl = requireEnv('SITE_URL');
const shotPath = requireEnv('SHOT_PATH');

// Puppeteer's own timeouts sit just under ours so that, where it can, Puppeteer names the CDP
// method that hung, which says more than our generic deadline message.
const clientTimeout = Math.max(1, STEP_TIMEOUT_MS - 1_000);

const browser = await step('connect', () =>
  puppeteer.connect({ browserWSEndpoint: cdpUrl, protocolTimeout: clientTimeout }),
);
const page = await step('new_page', () => browser.newPage());
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
// Puppeteer's close() sends `Browser.close` (errors swallowed) and then drops the connection.
await step('close_browser', () => browser.close());

succeed({ title, msg, sum, shot_bytes: shotBytes });
