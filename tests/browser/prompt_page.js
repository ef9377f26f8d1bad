// Scenario for test_prompt_page.py: drives the node's prompt page (/) like a user, with real mouse events.
//
// params: {base, token?, series_uid, k, point: [x, y], negative: [x, y], box: [[x0, y0], [x1, y1]], shots: dir}
// Returns what the page showed and sent at each step, read from the page (window.ainode) and its canvas.
'use strict';

module.exports = async (page, params, tools) => {
  const out = { steps: [] };
  const idle = async (what, timeout = 180000) => {
    await page.waitForFunction(() => !window.ainode.state.busy, null, { timeout });
    const status = await page.textContent('#status');
    if (await page.$eval('#status', (el) => el.classList.contains('error'))) {
      throw new Error(`${what}: the page reports an error: ${status}`);
    }
    return status;
  };
  // Screen position (page px) of voxel (x, y) on slice k, from the viewer's own forward transform.
  const screenOf = (x, y, k) => page.evaluate(([x, y, k]) => {
    const [cx, cy] = window.ainode.voxelToCanvas(x, y, k);
    const r = document.getElementById('viewport').getBoundingClientRect();
    return [r.left + cx, r.top + cy];
  }, [x, y, k]);
  const currentSlice = () => page.evaluate(() => window.ainode.viewport().getCurrentImageIdIndex());
  // Rendered colour at the centre of every voxel of slice k (read back from the viewport's canvas).
  const sampleSlice = (k) => page.evaluate((k) => {
    const canvas = document.querySelector('#viewport canvas');
    const scale = canvas.width / canvas.clientWidth;
    const ctx = canvas.getContext('2d');
    const img = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const [, rows, cols] = window.ainode.state.geom.shape;
    const px = [];
    for (let y = 0; y < rows; y++) {
      for (let x = 0; x < cols; x++) {
        const [cx, cy] = window.ainode.voxelToCanvas(x, y, k);
        const i = (Math.floor(cy * scale) * canvas.width + Math.floor(cx * scale)) * 4;
        px.push([img[i], img[i + 1], img[i + 2]]);
      }
    }
    return px;
  }, k);
  const snapshot = async (label) => page.evaluate(async (label) => {
    const s = window.ainode.state;
    const counts = window.ainode.overlayCounts();
    const overlay = [];
    for (let k = 0; k < s.labelmapIds.length; k++) {
      if (!counts[k]) continue;
      const data = window.ainode.cacheImage(s.labelmapIds[k]).voxelManager.getScalarData();
      for (let i = 0; i < data.length; i++) if (data[i]) overlay.push(k * data.length + i);
    }
    const r = await fetch(`/v1/sessions/${s.session.id}/mask`, {
      headers: s.token ? { Authorization: `Bearer ${s.token}` } : {},
    });
    return {
      label, request: s.lastRequest, response: s.lastResponse, overlay_counts: counts, overlay,
      api_mask: await r.json(), prompts: s.prompts.length, status: document.getElementById('status').textContent,
    };
  }, label);

  await page.goto(`${params.base}/`);
  await page.waitForFunction(() => window.ainode && window.ainode.ready, null, { timeout: 60000 });
  if (params.token) {
    // The API answers 401 without a token: the page asks for one.
    await page.waitForSelector('#auth:not([hidden])', { timeout: 30000 });
    out.asked_for_token = true;
    await page.fill('#token', params.token);
    await page.click('#token-form button');
  }
  const item = `#series li[data-uid="${params.series_uid}"]`;
  await page.waitForSelector(item, { timeout: 30000 });
  out.listed = await page.$$eval('#series li[data-uid]', (els) => els.map((e) => e.dataset.uid));
  await page.click(item);
  await page.waitForFunction(() => window.ainode.state.geom && window.ainode.state.session, null, { timeout: 120000 });
  await idle('open');
  out.session = await page.evaluate(() => window.ainode.state.session.id);
  out.shape = await page.evaluate(() => window.ainode.state.geom.shape);

  // Scroll with the mouse wheel over the image to slice k.
  const [vx, vy] = await page.evaluate(() => {
    const r = document.getElementById('viewport').getBoundingClientRect();
    return [r.left + r.width / 2, r.top + r.height / 2];
  });
  await page.mouse.move(vx, vy);
  // Wheel over the image until slice `target` shows (flipping the wheel's direction when it moved away).
  const scrollTo = async (target, trail) => {
    let delta = 100;
    trail.push(await currentSlice());
    for (let i = 0; i < 40 && (await currentSlice()) !== target; i++) {
      const before = await currentSlice();
      await page.mouse.wheel(0, delta);
      await tools.sleep(150);
      const after = await currentSlice();
      trail.push(after);
      if (Math.abs(after - target) >= Math.abs(before - target)) delta = -delta;
    }
  };
  out.scroll = [];
  await scrollTo(params.k, out.scroll);
  const k = await currentSlice();
  out.k = k;
  await tools.sleep(300);
  out.before = await sampleSlice(k); // the image alone: grey levels where the voxel centres are drawn

  // The click → voxel mapping, in the page: the centre of voxel (x, y) and points 0.45 voxel away from it
  // map back to (x, y, k); 0.55 voxel away lands on the neighbour.
  out.mapping = await page.evaluate(([k]) => {
    const a = window.ainode;
    const [, rows, cols] = a.state.geom.shape;
    const checks = [];
    for (const [x, y] of [[0, 0], [cols - 1, rows - 1], [cols - 1, 0], [0, rows - 1], [17, 42], [40, 9]]) {
      for (const [dx, dy, ex, ey] of [[0, 0, 0, 0], [0.45, 0.45, 0, 0], [-0.45, -0.45, 0, 0], [0.55, 0, 1, 0], [0, -0.55, 0, -1]]) {
        const got = a.voxelAt(a.voxelToCanvas(x + dx, y + dy, k));
        const want = (x + ex < 0 || y + ey < 0 || x + ex >= cols || y + ey >= rows) ? null : [x + ex, y + ey, k];
        checks.push({ at: [x + dx, y + dy], got, want });
      }
    }
    return checks;
  }, [k]);

  // 1. A positive click inside the object.
  const [px, py] = await screenOf(params.point[0], params.point[1], k);
  await page.mouse.click(px, py);
  await page.waitForFunction(() => (window.ainode.state.lastResponse || {}).step === 1, null, { timeout: 240000 });
  await idle('click');
  await tools.sleep(500);
  out.steps.push(await snapshot('point'));
  out.after_point = await sampleSlice(k);
  await page.screenshot({ path: `${params.shots}/prompt_page_point.png` });

  // 2. A negative point (Shift+click).
  const [nx, ny] = await screenOf(params.negative[0], params.negative[1], k);
  await page.keyboard.down('Shift');
  await page.mouse.click(nx, ny);
  await page.keyboard.up('Shift');
  await page.waitForFunction(() => (window.ainode.state.lastResponse || {}).step === 2, null, { timeout: 240000 });
  await idle('negative point');
  await tools.sleep(300);
  out.steps.push(await snapshot('negative'));

  // 3. A box, dragged with the box tool.
  await page.check('input[name="tool"][value="box"]');
  const [b0x, b0y] = await screenOf(params.box[0][0], params.box[0][1], k);
  const [b1x, b1y] = await screenOf(params.box[1][0], params.box[1][1], k);
  await page.mouse.move(b0x, b0y);
  await page.mouse.down();
  await page.mouse.move((b0x + b1x) / 2, (b0y + b1y) / 2, { steps: 4 });
  await page.mouse.move(b1x, b1y, { steps: 4 });
  out.rubber_band = await page.$$eval('#prompts-layer rect.rubber', (els) => els.length);
  await page.mouse.up();
  await page.waitForFunction(() => (window.ainode.state.lastResponse || {}).step === 3, null, { timeout: 240000 });
  await idle('box');
  await tools.sleep(500);
  out.steps.push(await snapshot('box'));
  out.after_box = await sampleSlice(k);
  out.drawn = await page.evaluate(() => ({
    positive: document.querySelectorAll('#prompts-layer circle.positive').length,
    negative: document.querySelectorAll('#prompts-layer circle.negative').length,
    boxes: document.querySelectorAll('#prompts-layer rect.box').length,
  }));
  await page.screenshot({ path: `${params.shots}/prompt_page_box.png` });

  // 4. Undo (the box) with the button.
  await page.click('#undo');
  await page.waitForFunction(() => (window.ainode.state.lastResponse || {}).step === 2, null, { timeout: 60000 });
  await idle('undo');
  out.steps.push(await snapshot('undo'));

  // Windowing: right-drag changes the window.
  const w0 = await page.evaluate(() => window.ainode.viewport().getProperties().voiRange);
  await page.mouse.move(vx, vy);
  await page.mouse.down({ button: 'right' });
  await page.mouse.move(vx + 60, vy + 40, { steps: 6 });
  await page.mouse.up({ button: 'right' });
  await tools.sleep(300);
  const w1 = await page.evaluate(() => window.ainode.viewport().getProperties().voiRange);
  out.window = { before: w0, after: w1 };

  // 5. 3D: the same click with mode 3D; the mask spans several slices; scroll to another one of them.
  await page.selectOption('#mode', '3d');
  await page.check('input[name="tool"][value="positive"]');
  await page.mouse.click(px, py);
  await page.waitForFunction(() => (window.ainode.state.lastResponse || {}).step === 3, null, { timeout: 300000 });
  await idle('3d click');
  const three = await snapshot('3d');
  out.steps.push(three);
  const others = three.api_mask.slices.filter((s) => s !== k);
  if (others.length) {
    const k2 = others.reduce((a, b) => (Math.abs(b - k) < Math.abs(a - k) ? b : a));
    await page.mouse.move(vx, vy);
    await scrollTo(k2, []);
    await tools.sleep(400);
    out.other_slice = { k: await currentSlice(), pixels: await sampleSlice(await currentSlice()) };
  }

  // Ctrl+wheel zooms, middle drag pans (the camera; the mapping above follows it).
  const camera = () => page.evaluate(() => {
    const vp = window.ainode.viewport();
    return { zoom: vp.getZoom(), pan: vp.getPan() };
  });
  const c0 = await camera();
  await page.mouse.move(vx, vy);
  await page.keyboard.down('Control');
  await page.mouse.wheel(0, -300);
  await tools.sleep(200);
  await page.keyboard.up('Control');
  const c1 = await camera();
  await page.mouse.down({ button: 'middle' });
  await page.mouse.move(vx + 40, vy + 30, { steps: 5 });
  await page.mouse.up({ button: 'middle' });
  await tools.sleep(200);
  const c2 = await camera();
  out.camera = [c0, c1, c2];
  // After zooming and panning a voxel centre still maps back to its voxel.
  out.mapping_zoomed = await page.evaluate(() => {
    const a = window.ainode;
    const k = a.viewport().getCurrentImageIdIndex();
    return [[20, 30], [41, 37]].map(([x, y]) => ({ got: a.voxelAt(a.voxelToCanvas(x + 0.4, y - 0.4, k)), want: [x, y, k] }));
  });

  // 6. Commit (back on the lesion's slice); the page follows the delivery until it is done.
  await page.mouse.move(vx, vy);
  await scrollTo(k, []);
  await page.click('#commit');
  await page.waitForFunction(() => window.ainode.state.lastCommit, null, { timeout: 120000 });
  await idle('commit');
  out.commit = await page.evaluate(() => window.ainode.state.lastCommit);
  await page.waitForFunction(() => /delivered/.test(document.getElementById('result').textContent), null,
    { timeout: 90000 });
  out.result_panel = await page.textContent('#result');
  out.final_status = await page.textContent('#status');
  out.latencies = await page.evaluate(() => window.ainode.state.latencies);
  await page.screenshot({ path: `${params.shots}/prompt_page_committed.png` });
  return out;
};
