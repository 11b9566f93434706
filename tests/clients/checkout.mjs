// An agent that shops: opens the shop, browses, presses "Buy" and reads what happened, while
// a human decides on the held checkout through chaperone's control API (the test does that).
//
// Env: CHAPERONE_CDP_URL, SHOP_URL, optional STEP_TIMEOUT_MS.
// Stdout: exactly one JSON line, `{"ok":true,"result":...}` or `{"ok":false,...}`. With
// DEBUG=pw:protocol, Playwright writes every CDP message it receives to stderr, which the test
// searches for anything of the approval.

import { chromium } from 'playwright-core';
import { STEP_TIMEOUT_MS, installGuards, requireEnv, step, succeed } from './common.mjs';

installGuards();

const cdpUrl = requireEnv('CHAPERONE_CDP_URL');
const shopUrl = requireEnv('SHOP_URL');
const clientTimeout = Math.max(1, STEP_TIMEOUT_MS - 1_000);

const browser = await step('connect', () => chromium.connectOverCDP(cdpUrl, { timeout: clientTimeout }));
const context = browser.contexts()[0];
const page = await step('new page', () => context.newPage());
await step('open the shop', () => page.goto(shopUrl, { timeout: clientTimeout }));
await step('browse', () => page.goto(`${shopUrl}browse`, { timeout: clientTimeout }));
await step('back to the shop', () => page.goto(shopUrl, { timeout: clientTimeout }));
await step('press buy', () => page.click('#buy', { timeout: clientTimeout }));
// The checkout waits for a human; the page shows the outcome once it is decided.
const result = await step('wait for the outcome', async () => {
  await page.waitForFunction(() => document.querySelector('#result').textContent !== '', null, {
    timeout: clientTimeout,
  });
  return page.textContent('#result');
});
await step('browse after', () => page.goto(`${shopUrl}browse`, { timeout: clientTimeout }));
await step('close', () => browser.close());
succeed({ result });
