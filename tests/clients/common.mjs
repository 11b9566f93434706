// Shared plumbing for the real-client drivers: configuration from the environment, bounded steps
// and the one-line JSON verdict that chaperone's end-to-end tests parse.
//
// Every step runs under its own deadline, and a process-wide deadline backs them up, because a
// client that hangs on a filtered CDP method must show up as a failure naming that step rather
// than as a test that never ends.

import { readFile } from 'node:fs/promises';
import { inspect } from 'node:util';

/** What the test page must show; the tests serve a page with exactly these. */
export const EXPECTED_TITLE = 'chaperone test';
export const EXPECTED_MSG = 'hello from site';

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
const MAX_ERROR_CHARS = 4000;

let currentStep = 'start';
let finished = false;

/** Raised for a check that failed, so the verdict can tell it from a client error. */
export class CheckError extends Error {
  name = 'CheckError';
}

function positiveInt(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value <= 0) {
    fail('config', new CheckError(`${name}=${raw}: expected a positive integer of milliseconds`));
  }
  return value;
}

/** Reads a required environment variable or fails the `config` step naming it. */
export function requireEnv(name) {
  const value = process.env[name];
  if (value === undefined || value === '') {
    fail('config', new CheckError(`${name} is not set: the test harness must pass it`));
  }
  return value;
}

function emit(obj) {
  // One line on stdout is the whole protocol with the harness; client chatter goes to stderr.
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

// Clients reject with more than Error: Puppeteer's failed connect rejects with the websocket's
// ErrorEvent, whose String() is "[object Object]" and whose cause sits in `.error`.
function describe(err) {
  if (err instanceof Error) return `${err.name}: ${err.message}`;
  if (err && typeof err === 'object') {
    if (err.error instanceof Error) return describe(err.error);
    if (typeof err.message === 'string' && err.message !== '') return err.message;
    return inspect(err, { depth: 2, breakLength: Infinity });
  }
  return String(err);
}

function errorText(err) {
  // Playwright colours its call log; escape codes are noise in a JSON verdict.
  const text = describe(err).replace(/\u001b\[[0-9;]*m/g, '');
  return text.length > MAX_ERROR_CHARS ? `${text.slice(0, MAX_ERROR_CHARS)}…` : text;
}

/** Prints the failure verdict for `step` and exits 1. Only the first verdict is printed. */
export function fail(step, err) {
  if (!finished) {
    finished = true;
    emit({ ok: false, step, error: errorText(err) });
  }
  process.exit(1);
}

/** Prints the success verdict and exits 0. */
export function succeed(result) {
  if (!finished) {
    finished = true;
    emit({ ok: true, ...result });
  }
  process.exit(0);
}

// Declared after the verdict helpers: a bad value fails the run through them, so they must exist.
/** Deadline for one step, in milliseconds (`STEP_TIMEOUT_MS` overrides). */
export const STEP_TIMEOUT_MS = positiveInt('STEP_TIMEOUT_MS', 30_000);

/** Deadline for the whole run, in milliseconds (`TOTAL_TIMEOUT_MS` overrides). */
export const TOTAL_TIMEOUT_MS = positiveInt('TOTAL_TIMEOUT_MS', 180_000);

/**
 * Runs `fn` as the step called `name`, failing the run if it throws or outlives its deadline.
 * The timer is cleared on completion so a finished run is never held open by it.
 */
export async function step(name, fn, timeoutMs = STEP_TIMEOUT_MS) {
  currentStep = name;
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`step did not finish within ${timeoutMs} ms`)),
      timeoutMs,
    );
  });
  try {
    return await Promise.race([Promise.resolve().then(fn), deadline]);
  } catch (err) {
    fail(name, err);
  } finally {
    clearTimeout(timer);
  }
}

/** Fails the current step with `message` unless `cond` holds. */
export function check(cond, message) {
  if (!cond) throw new CheckError(message);
}

/** Checks that the screenshot at `path` is a PNG and returns its size in bytes. */
export async function pngSize(path) {
  const bytes = await readFile(path);
  check(
    bytes.length > PNG_SIGNATURE.length &&
      bytes.subarray(0, PNG_SIGNATURE.length).equals(PNG_SIGNATURE),
    `${path} does not start with the PNG signature (${bytes.length} bytes)`,
  );
  return bytes.length;
}

/** Checks what the page showed against the test site's fixed content. */
export function checkPage({ title, msg, sum }) {
  checkEqual('title', title, EXPECTED_TITLE);
  checkEqual('#msg text', msg, EXPECTED_MSG);
  checkEqual('1+1', sum, 2);
}

/** Fails the current step unless `actual` is `expected`, naming `what` was compared. */
export function checkEqual(what, actual, expected) {
  check(
    actual === expected,
    `${what} is ${JSON.stringify(actual)}, expected ${JSON.stringify(expected)}`,
  );
}

/**
 * Installs the run-wide backstops: a total deadline, and handlers that turn a stray rejection or
 * exception (e.g. a client's event handler throwing) into a verdict naming the step in progress.
 */
export function installGuards() {
  // Not unref'd on purpose: a run whose pending promises hold no handle must still end in a
  // verdict, not in a silent exit.
  setTimeout(() => {
    fail(currentStep, new Error(`run did not finish within ${TOTAL_TIMEOUT_MS} ms`));
  }, TOTAL_TIMEOUT_MS);
  process.on('unhandledRejection', (err) => fail(currentStep, err));
  process.on('uncaughtException', (err) => fail(currentStep, err));
  process.on('exit', () => {
    if (!finished) {
      finished = true;
      emit({ ok: false, step: currentStep, error: 'process exited before a verdict' });
      process.exitCode = 1;
    }
  });
}
