// Logs in to the test bank through Playwright's `connectOverCDP`, in the browser's default
// context and in a new one, and reports what Playwright's own cookie APIs show
// (`context.cookies()`, `context.storageState()`, `document.cookie`). chaperone's credential
// tests grep the whole verdict for held secrets: through chaperone the bank must let the agent in
// while none of these shows the bank's cookies.
//
// Env: CDP_URL, BANK_URL (`http://bank.test:<port>`), optional STEP_TIMEOUT_MS / TOTAL_TIMEOUT_MS.
// Stdout: exactly one JSON line (see common.mjs).

import { chromium } from 'playwright-core';
import { STEP_TIMEOUT_MS, installGuards, requireEnv, step, succeed } from './common.mjs';

installGuards();

const cdpUrl = requireEnv('CDP_URL');
const bank = requireEnv('BANK_URL');
const clientTimeout = Math.max(1, STEP_TIMEOUT_MS - 1_000);

const browser = await step('connect', () =>
  chromium.connectOverCDP(cdpUrl, { timeout: clientTimeout }),
);

const results = {};
const contexts = [['new', () => browser.newContext()]];
// Agents often reuse the default context; check it too where the endpoint exposes one.
if (browser.contexts()[0]) contexts.unshift(['default', () => browser.contexts()[0]]);

for (const [label, getContext] of contexts) {
  const context = await step(`${label}_context`, getContext);
  const page = await step(`${label}_new_page`, () => context.newPage());
  page.setDefaultTimeout(clientTimeout);
  page.setDefaultNavigationTimeout(clientTimeout);
  await step(`${label}_login`, async () => {
    await page.goto(`${bank}/login`);
    await Promise.all([page.waitForURL('**/account'), page.click('button')]);
  });
  const welcome = await step(`${label}_account`, () => page.textContent('#msg'));
  await step(`${label}_goto_session_page`, () => page.goto(`${bank}/account/session`));
  const sessionWelcome = await step(`${label}_session_page`, () => page.textContent('#msg'));
  const cookies = await step(`${label}_cookies`, () => context.cookies());
  const bankCookies = await step(`${label}_bank_cookies`, () => context.cookies(bank));
  // A failure here is a finding, not the end of the run: the cookie checks above and below
  // still need their verdict, so the error travels in the result.
  const state = await step(`${label}_storage_state`, () =>
    context.storageState().catch((e) => ({ error: String(e.message || e).split('\n')[0] })),
  );
  const docCookie = await step(`${label}_document_cookie`, () =>
    page.evaluate(() => document.cookie),
  );
  results[label] = { welcome, sessionWelcome, cookies, bankCookies, state, docCookie };
  await step(`${label}_close_page`, () => page.close());
}

await step('close_browser', () => browser.close());
succeed({ results });
