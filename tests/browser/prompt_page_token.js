// Scenario for test_prompt_page.py: with api.tokens on, the page asks for a token and then works with it.
// params: {base, token, series_uid, shots}
'use strict';

module.exports = async (page, params, tools) => {
  const out = {};
  await page.goto(`${params.base}/`);
  await page.waitForFunction(() => window.ainode && window.ainode.ready, null, { timeout: 60000 });
  await page.waitForSelector('#auth:not([hidden])', { timeout: 30000 });
  out.asked_for_token = true;
  await page.fill('#token', params.token);
  await page.click('#token-form button');
  const item = `#series li[data-uid="${params.series_uid}"]`;
  await page.waitForSelector(item, { timeout: 30000 });
  out.listed = await page.$$eval('#series li[data-uid]', (els) => els.map((e) => e.dataset.uid));
  await page.click(item);
  await page.waitForFunction(() => window.ainode.state.session && !window.ainode.state.busy, null, { timeout: 120000 });
  await tools.sleep(500);
  out.session_user = await page.evaluate(() => window.ainode.state.session.user);
  out.loaded_slices = tools.requests.filter((r) => /\/v1\/sessions\/[0-9a-f]+\/slices\/\d+$/.test(r.url) && r.status === 200).length;
  await page.screenshot({ path: `${params.shots}/prompt_page_token.png` });
  return out;
};
