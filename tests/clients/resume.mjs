// An agent that loses its connection and comes back with a resume ticket, driven by a real
// client (Playwright `connectOverCDP` or Puppeteer `connect`).
//
// Env: CLIENT=playwright|puppeteer, PHASE=first|second, SITE_URL, optional STEP_TIMEOUT_MS.
//   first:  CHAPERONE_CDP_URL. Opens SITE_URL in the default context, asks chaperone for a resume
//           ticket with the CDP command `Chaperone.getResumeTicket`, prints the verdict and exits
//           at once: the process ends without closing its websocket, as a crashed agent would.
//   second: RESUME_URL. Reconnects with the ticket, finds the page the first phase opened and
//           reads it.
// Stdout: exactly one JSON line, `{"ok":true,...}` or `{"ok":false,"step":...,"error":...}`.

import { chromium } from 'playwright-core';
import puppeteer from 'puppeteer-core';
import {
  EXPECTED_MSG,
  STEP_TIMEOUT_MS,
  check,
  installGuards,
  requireEnv,
  step,
  succeed,
} from './common.mjs';

installGuards();

const client = requireEnv('CLIENT');
const phase = requireEnv('PHASE');
const siteUrl = requireEnv('SITE_URL');
const clientTimeout = Math.max(1, STEP_TIMEOUT_MS - 1_000);
const headers = process.env.AGENT_KEY ? { Authorization: `Bearer ${process.env.AGENT_KEY}` } : {};

async function connect(url) {
  if (client === 'playwright') {
    return chromium.connectOverCDP(url, { timeout: clientTimeout, headers });
  }
  return puppeteer.connect({ browserWSEndpoint: url, protocolTimeout: clientTimeout, headers });
}

/** The browser-level CDP session chaperone answers `Chaperone.*` on. */
async function browserSession(browser) {
  if (client === 'playwright') return browser.newBrowserCDPSession();
  return browser.target().createCDPSession();
}

async function pages(browser) {
  if (client === 'playwright') return browser.contexts().flatMap((c) => c.pages());
  return browser.pages();
}

async function text(page) {
  return page.evaluate("document.querySelector('#msg').textContent");
}

if (phase === 'first') {
  const browser = await step('connect', () => connect(requireEnv('CHAPERONE_CDP_URL')));
  const page = await step('new_page', async () => {
    if (client === 'playwright') return browser.contexts()[0].newPage();
    return browser.newPage();
  });
  await step('goto', () => page.goto(siteUrl, { waitUntil: 'load' }));
  const msg = await step('read', () => text(page));
  check(msg === EXPECTED_MSG, `page text ${JSON.stringify(msg)}`);
  const cdp = await step('browser_session', () => browserSession(browser));
  const t = await step('ticket', () => cdp.send('Chaperone.getResumeTicket'));
  check(typeof t.resumeUrl === 'string' && t.resumeUrl.includes('?ticket='), JSON.stringify(t));
  // `succeed` exits the process without closing the websocket: the connection just drops.
  succeed({ resumeUrl: t.resumeUrl, httpUrl: t.httpUrl, seq: t.seq });
} else {
  const browser = await step('reconnect', () => connect(requireEnv('RESUME_URL')));
  const page = await step('find_page', async () => {
    for (let i = 0; i < 100; i++) {
      const found = (await pages(browser)).find((p) => p.url() === siteUrl);
      if (found) return found;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`no page at ${siteUrl} after the resumption`);
  });
  const msg = await step('read', () => text(page));
  check(msg === EXPECTED_MSG, `page text ${JSON.stringify(msg)}`);
  // The resumed connection can ask for its next ticket.
  const cdp = await step('browser_session', () => browserSession(browser));
  const t = await step('next_ticket', () => cdp.send('Chaperone.getResumeTicket'));
  succeed({ msg, nextSeq: t.seq });
}
