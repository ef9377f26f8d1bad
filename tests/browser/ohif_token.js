// OHIF with the node's bearer tokens on: the viewer URL carries ?token=, OHIF sends it as a bearer token.
// params: {base, study, token}. Returns the viewport's slice counter text and the image count.
'use strict';

module.exports = async (page, p, tools) => {
  await page.goto(`${p.base}/ohif/viewer?StudyInstanceUIDs=${p.study}&token=${encodeURIComponent(p.token)}`,
                  { waitUntil: 'domcontentloaded' });
  await page.waitForFunction(() => {
    const cs = window.cornerstone;
    const ee = cs && cs.getEnabledElements && cs.getEnabledElements()[0];
    return !!(ee && ee.viewport && ee.viewport.getCurrentImageId && ee.viewport.getCurrentImageId()
              && ee.viewport.getCornerstoneImage && ee.viewport.getCornerstoneImage());
  }, null, { timeout: 90000, polling: 250 });
  const info = await page.evaluate(() => {
    const vp = window.cornerstone.getEnabledElements()[0].viewport;
    return { imageIds: vp.getImageIds().length, current: vp.getCurrentImageId() };
  });
  await page.screenshot({ path: `${p.out}/ohif_viewer_token.png` });
  tools.log('viewer with token rendered');
  return info;
};
