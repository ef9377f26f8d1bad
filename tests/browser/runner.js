// Runs one browser scenario in Debian's chromium through playwright-core (never a downloaded browser).
// Called by tests/browser/browser_helpers.py:  node runner.js SCENARIO.js SPEC.json RESULT.json
//
// SPEC.json: {executablePath, args, userDataDir, viewport: {width, height}, params, allowHosts}
// SCENARIO.js exports  async (page, params, tools) => result   where tools = {context, log, requests, sleep}.
// RESULT.json receives {result, error, console, requests, blocked}: `console` holds the page's console
// messages, page errors, failed and >= 400 responses; `requests` every request with its status;
// `blocked` every request to a host outside allowHosts (aborted: the page stays on loopback).
'use strict';
const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const [scenarioPath, specPath, resultPath] = process.argv.slice(2);
const spec = JSON.parse(fs.readFileSync(specPath, 'utf8'));
const allow = new Set(spec.allowHosts || ['127.0.0.1', 'localhost', '[::1]']);
const out = { result: null, error: null, console: [], requests: [], blocked: [] };
const t0 = Date.now();
const log = msg => out.console.push(`[${((Date.now() - t0) / 1000).toFixed(2)}s] ${msg}`);

function save() {
  fs.writeFileSync(resultPath, JSON.stringify(out));
}

(async () => {
  let context = null;
  try {
    context = await chromium.launchPersistentContext(spec.userDataDir, {
      executablePath: spec.executablePath,
      headless: true,
      args: spec.args,
      viewport: spec.viewport,
      timeout: 60000,
    });
    await context.route('**/*', route => {
      const url = route.request().url();
      let host = '';
      try { host = new URL(url).hostname; } catch (e) { /* data: etc. */ }
      if (url.startsWith('data:') || url.startsWith('blob:') || allow.has(host)) return route.continue();
      out.blocked.push(url);
      return route.abort('blockedbyclient');
    });
    const page = context.pages()[0] || await context.newPage();
    page.on('console', m => log(`[console.${m.type()}] ${m.text().slice(0, 2000)}`));
    page.on('pageerror', e => log(`[pageerror] ${String(e && e.stack || e).slice(0, 2000)}`));
    page.on('requestfailed', r => log(`[requestfailed] ${r.method()} ${r.url()} ${r.failure() && r.failure().errorText}`));
    page.on('response', r => {
      const req = r.request();
      out.requests.push({ method: req.method(), url: req.url(), status: r.status(), type: req.resourceType(),
                         accept: req.headers()['accept'] || '', contentType: r.headers()['content-type'] || '' });
      if (r.status() >= 400) log(`[http ${r.status()}] ${req.method()} ${req.url()}`);
    });
    const scenario = require(path.resolve(scenarioPath));
    const sleep = ms => new Promise(res => setTimeout(res, ms));
    out.result = await scenario(page, spec.params || {}, { context, log, requests: out.requests, sleep });
  } catch (e) {
    out.error = String(e && e.stack || e);
  } finally {
    if (context) await context.close().catch(e => log(`[close] ${e}`));
    save();
  }
})();
