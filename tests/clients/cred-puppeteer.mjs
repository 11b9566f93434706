// Logs in to the test bank through Puppeteer's `connect({browserWSEndpoint})` and reports what
// Puppeteer's cookie APIs show (`page.cookies()`, `browser.cookies()` where this version has it,
// `document.cookie`). chaperone's credential tests grep the whole verdict for held secrets.
//
// Env: CDP_URL, BANK_URL (`http://bank.test:<port>`), optional STEP_TIMEOUT_MS / TOTAL_TIMEOUT_MS.
// Stdout: exactly one JSON line (see common.mjs).

import puppeteer from 'puppeteer-core';
import { STEP_TIMEOUT_MS, installGuards, requireEnv, step, succeed } from './common.mjs';

installGuards();

const cdpUrl = requireEnv('CDP_URL');
const bank = requireEnv('BANK_URL');
const clientTimeout = Math.max(1, STEP_TIMEOUT_MS - 1_000);

const browser = await step('connect', () =>
  puppeteer.connect({ browserWSEndpoint: cdpUrl, protocolTimeout: clientTimeout }),
);
const page = await step('new_page', () => browser.newPage());
page.setDefaultTimeout(clientTimeout);
page.setDefaultNavigationTimeout(clientTimeout);

await step('login', async () => {
  await page.goto(`${bank}/login`);
  await Promise.all([page.waitForNavigation(), page.click('button')]);
});
const welcome = await step('account', () => page.$eval('#msg', (e) => e.textContent));
await step('goto_session_page', () => page.goto(`${bank}/account/session`));
const sessionWelcome = await step('session_page', () => page.$eval('#msg', (e) => e.textContent));
const cookies = await step('page_cookies', () => page.cookies());
const bankCookies = await step('page_cookies_bank', () => page.cookies(bank));
const browserCookies =
  typeof browser.cookies === 'function'
    ? await step('browser_cookies', () => browser.cookies())
    : null;
const docCookie = await step('document_cookie', () => page.evaluate(() => document.cookie));

await step('close_page', () => page.close());
await step('disconnect', () => browser.disconnect());
succeed({ welcome, sessionWelcome, cookies, bankCookies, browserCookies, docCookie });
