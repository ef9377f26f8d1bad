// OHIF (served by the node at /ohif/) shows a study with its SEG, and loads the SEG onto the image.
// params: {base, study, seg, patient, out}. Returns what the page shows and what OHIF's services hold:
//   studyListText, panelText: visible text of the study list and of the selected study's panel;
//   segmentations: [{label, segments: [{segmentIndex, label}], voxelsBySop: {SOPInstanceUID: n}}]
//   where voxelsBySop counts non-zero labelmap voxels per referenced source image.
'use strict';

module.exports = async (page, p, tools) => {
  // 1) The study list: the study's row (patient name), then its series panel (modalities / series).
  await page.goto(`${p.base}/ohif/`, { waitUntil: 'domcontentloaded' });
  await page.getByText(p.patient).first().waitFor({ timeout: 90000 });
  const studyListText = await page.evaluate(() => document.body.innerText);
  await page.getByText(p.patient).first().click();
  await page.getByText(p.segDescription).first().waitFor({ timeout: 60000 });
  await tools.sleep(500);
  await page.screenshot({ path: `${p.out}/ohif_studylist.png` });
  const panelText = await page.evaluate(() => document.body.innerText);
  tools.log('study list rendered');

  // 2) The viewer opened on the SEG series: OHIF hydrates it onto the referenced image series
  //    (no confirmation prompt: disableConfirmationPrompts in the node's app config).
  await page.goto(`${p.base}/ohif/viewer?StudyInstanceUIDs=${p.study}&initialSeriesInstanceUID=${p.seg}`,
                  { waitUntil: 'domcontentloaded' });
  await page.waitForFunction(() => {
    const s = window.services && window.services.segmentationService;
    if (!s || s.getSegmentations().length === 0) return false;
    const lm = s.getSegmentations()[0].representationData.Labelmap;
    return !!(lm && lm.imageIds && lm.imageIds.length && lm.imageIds.every(id => window.cornerstone.cache.getImage(id)));
  }, null, { timeout: 120000, polling: 250 });
  tools.log('segmentation hydrated');
  const segmentations = await page.evaluate(() => {
    const cs = window.cornerstone;
    return window.services.segmentationService.getSegmentations().map(s => {
      const lm = s.representationData.Labelmap;
      const voxelsBySop = {};
      for (const id of lm.imageIds) {
        const img = cs.cache.getImage(id);
        const data = img.voxelManager ? img.voxelManager.getScalarData() : img.getPixelData();
        let n = 0;
        for (let i = 0; i < data.length; i++) if (data[i] !== 0) n++;
        const m = /\/instances\/([0-9.]+)\/frames\//.exec(img.referencedImageId || '');
        const sop = m ? m[1] : String(img.referencedImageId);
        if (n) voxelsBySop[sop] = (voxelsBySop[sop] || 0) + n;
      }
      return {
        label: s.label,
        segments: Object.values(s.segments).filter(Boolean).map(x => ({ segmentIndex: x.segmentIndex, label: x.label })),
        voxelsBySop,
      };
    });
  });
  // Evidence: wait until the viewport shows its slice counter, then a screenshot (software WebGL lags:
  // the numbers above are what the test asserts on).
  await page.getByText(/\(\d+\/\d+\)/).first().waitFor({ timeout: 60000 }).catch(() => {});
  await tools.sleep(1500);
  await page.screenshot({ path: `${p.out}/ohif_viewer_seg.png` });
  return { studyListText, panelText, segmentations };
};
