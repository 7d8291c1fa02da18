// Drives the dashboard in Debian's headless Chromium and reports what a
// person would have seen, as one JSON line at the end of stdout;
// tests/dashboard.rs runs it inside the agent's network namespace and judges
// the report against the traffic it sent.
//
// node check.mjs '{"url": "...", "port": 47001, "screenshot": "...png",
//                  "token": "...", "wrongToken": "...", "restart": false}'
//
// token and wrongToken: the agent runs with --api-token; the page is given
// the wrong one first, then the right one. restart: instead of watching the
// traffic, print `connected`, wait for the page to show the agent gone (the
// test stops it), print `reconnecting`, and wait for the page to come back by
// itself (the test starts the agent again).

import { chromium } from 'playwright-core';

const args = JSON.parse(process.argv[2]);
const TIMEOUT = 20000;
const AGENT_AWAY_TIMEOUT = 60000;

const report = {
  pageStatus: null,
  pageHeaders: {},
  requests: [],          // every URL the page asked for
  consoleErrors: [],     // {text, url}
  pageErrors: [],        // uncaught exceptions
  failedRequests: [],    // network failures (no HTTP answer)
  errorResponses: [],    // {url, status} with status >= 400
  websockets: [],        // {url, frames}
};

function listen(page) {
  page.on('console', (m) => {
    if (m.type() === 'error') report.consoleErrors.push({ text: m.text(), url: m.location().url });
  });
  page.on('pageerror', (e) => report.pageErrors.push(String(e)));
  page.on('request', (r) => report.requests.push(r.url()));
  page.on('requestfailed', (r) => {
    report.failedRequests.push({ url: r.url(), error: r.failure()?.errorText });
  });
  page.on('response', (r) => {
    if (r.status() >= 400) report.errorResponses.push({ url: r.url(), status: r.status() });
  });
  page.on('websocket', (ws) => {
    const entry = { url: ws.url(), frames: 0 };
    report.websockets.push(entry);
    ws.on('framereceived', () => entry.frames++);
  });
}

const state = (page) => page.locator('#status').getAttribute('data-state');
const waitState = (page, want, timeout = TIMEOUT) =>
  page.waitForFunction((s) => document.querySelector('#status').dataset.state === s, want, { timeout });

// Points drawn on the packets/s chart and the last value drawn.
const chart = async (page) => ({
  points: Number(await page.locator('#chart-pps').getAttribute('data-points')),
  last: Number(await page.locator('#chart-pps').getAttribute('data-last')),
});

// The page asks once; a wrong token is an error state, not a crash.
async function giveToken(page) {
  await waitState(page, 'needs-token');
  report.formShown = await page.locator('#auth').isVisible();
  report.errorShownBeforeAnyToken = await page.locator('#auth-error').isVisible();
  await page.fill('#token-input', args.wrongToken);
  await page.click('#auth button');
  await page.locator('#auth-error').waitFor({ state: 'visible' });
  report.wrongToken = {
    state: await state(page),
    errorText: await page.locator('#auth-error').textContent(),
    formShown: await page.locator('#auth').isVisible(),
  };
  await page.screenshot({ path: args.screenshot.replace(/\.png$/, '-form.png') });
  await page.fill('#token-input', args.token);
  await page.click('#auth button');
}

// Six readings a second apart of the chart and of the test's flow.
async function watchTraffic(page) {
  const row = page.locator(`#connections tbody tr[data-dst-port="${args.port}"]`).first();
  await row.waitFor();
  report.chart = [];
  report.flow = [];
  for (let i = 0; i < 6; i++) {
    report.chart.push(await chart(page));
    report.flow.push({
      at: Date.now(),
      protocol: await row.getAttribute('data-protocol'),
      packets: Number(await row.getAttribute('data-packets')),
      rate: Number(await row.getAttribute('data-rate')),
    });
    await page.waitForTimeout(1000);
  }
  report.shown = {
    pps: await page.locator('#pps').textContent(),
    ringBufferDrops: await page.locator('#ring-buffer-drops').textContent(),
    flowMapFull: await page.locator('#flow-map-full').textContent(),
    sampledOut: await page.locator('#samples-sampled-out').textContent(),
    sampleRate: await page.locator('#sample-rate').textContent(),
  };
  await page.screenshot({ path: args.screenshot, fullPage: true });
  if (args.token) {
    // The token is kept for the tab: a reload does not ask again.
    await page.reload({ waitUntil: 'load' });
    await waitState(page, 'connected');
    report.formShownAfterReload = await page.locator('#auth').isVisible();
  }
}

async function watchRestart(page) {
  await page.waitForFunction(() => Number(document.querySelector('#chart-pps').dataset.points) >= 2);
  report.beforeRestart = await chart(page);
  console.log('connected');
  await waitState(page, 'reconnecting', AGENT_AWAY_TIMEOUT);
  report.uptimeBefore = await page.locator('#uptime').textContent();
  await page.screenshot({ path: args.screenshot.replace(/\.png$/, '-away.png'), fullPage: true });
  console.log('reconnecting');
  await waitState(page, 'connected', AGENT_AWAY_TIMEOUT);
  const before = await chart(page);
  await page.waitForTimeout(3000);
  report.afterReconnect = [before, await chart(page)];
  report.uptimeAfter = await page.locator('#uptime').textContent();
  await page.screenshot({ path: args.screenshot, fullPage: true });
}

const browser = await chromium.launch({ executablePath: '/usr/bin/chromium' });
try {
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  listen(page);
  const main = await page.goto(args.url, { waitUntil: 'load' });
  report.pageStatus = main.status();
  report.pageHeaders = await main.allHeaders();
  if (args.token) await giveToken(page);
  await waitState(page, 'connected');
  report.formShownWhenConnected = await page.locator('#auth').isVisible();
  await (args.restart ? watchRestart(page) : watchTraffic(page));
  report.finalState = await state(page);
  await context.close();
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
