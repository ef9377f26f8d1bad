// The ainode prompt page: a cornerstone3D stack viewport over the node's /v1 sessions.
//
// Image: a custom cornerstone image loader ('ainode:<session>:<k>') fetches one slice's float32 voxels
// from GET /v1/sessions/{id}/slices/{k}; the metadata provider answers from GET /v1/sessions/{id}/slices
// (per-slice ImagePositionPatient, orientation, spacing), so slice k of the viewer is slice k of the API.
// Prompts: clicks and drags are mapped screen → world (viewport.canvasToWorld) → voxel (x, y, k) with the
// series' own geometry and sent to POST /v1/sessions/{id}/prompts?output=bin; the returned mask is written
// into a cornerstone-tools labelmap (one derived image per slice) and rendered over the image.
import {
  RenderingEngine, Enums, init as csInit, imageLoader, metaData, cache, utilities as csUtils,
} from '@cornerstonejs/core';
import {
  init as toolsInit, addTool, ToolGroupManager, StackScrollTool, WindowLevelTool, PanTool, ZoomTool,
  segmentation, Enums as ToolEnums,
} from '@cornerstonejs/tools';

const ENGINE_ID = 'ainode-engine';
const VIEWPORT_ID = 'ainode-stack';
const TOOLGROUP_ID = 'ainode-tools';
const SCHEME = 'ainode';
const SVG_NS = 'http://www.w3.org/2000/svg';

const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem('ainode.token') || '',
  session: null, // session JSON from POST /v1/sessions
  geom: null, // GET /v1/sessions/{id}/slices
  imageIds: [],
  labelmapIds: [],
  segmentationId: null,
  prompts: [], // {kind: 'point'|'box', positive, ijk: [x, y, k] | [[x0, y0, k], [x1, y1, k]]}
  history: [], // number of prompts per step (for undo)
  voxelCount: 0,
  busy: false,
  drag: null,
  lastRequest: null,
  lastResponse: null,
  lastCommit: null,
  latencies: [],
};
// Exposed for tests and debugging (read-only use).
window.ainode = { state };

// ------------------------------------------------------------------ HTTP

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set('Authorization', `Bearer ${state.token}`);
  const r = await fetch(path, { ...options, headers });
  if (!r.ok) {
    let message = `${r.status} ${r.statusText}`;
    try {
      const body = await r.json();
      message = body.error || body.detail || message;
    } catch { /* not JSON */ }
    if (r.status === 401) showAuth(message);
    throw new ApiError(r.status, message);
  }
  return r;
}

function setStatus(text, error = false) {
  const el = $('status');
  el.textContent = text;
  el.classList.toggle('error', error);
}

function showAuth(message) {
  $('auth').hidden = false;
  setStatus(message, true);
}

// ------------------------------------------------------------------ image loading and metadata

function parseImageId(imageId) {
  const [, sid, k] = imageId.split(':');
  return { sid, k: Number(k) };
}

function loadImage(imageId) {
  const { sid, k } = parseImageId(imageId);
  const promise = (async () => {
    const geom = state.geom;
    const r = await api(`/v1/sessions/${sid}/slices/${k}`);
    const buffer = await r.arrayBuffer();
    const [, rows, columns] = geom.shape;
    const scalarData = new Float32Array(buffer);
    if (scalarData.length !== rows * columns) {
      throw new Error(`slice ${k}: ${scalarData.length} voxels, expected ${rows * columns}`);
    }
    let min = Infinity;
    let max = -Infinity;
    for (let i = 0; i < scalarData.length; i++) {
      const v = scalarData[i];
      if (v < min) min = v;
      if (v > max) max = v;
    }
    const voxelManager = csUtils.VoxelManager.createImageVoxelManager({
      width: columns, height: rows, numberOfComponents: 1, scalarData, id: imageId,
    });
    return {
      imageId,
      minPixelValue: min,
      maxPixelValue: max,
      slope: 1,
      intercept: 0,
      windowCenter: geom.window.center,
      windowWidth: geom.window.width,
      voiLUTFunction: Enums.VOILUTFunctionType.LINEAR,
      getPixelData: () => voxelManager.getScalarData(),
      getCanvas: undefined,
      rows,
      columns,
      height: rows,
      width: columns,
      color: false,
      rgba: false,
      numberOfComponents: 1,
      columnPixelSpacing: geom.pixel_spacing[1],
      rowPixelSpacing: geom.pixel_spacing[0],
      sliceThickness: geom.slice_spacing,
      invert: false,
      photometricInterpretation: 'MONOCHROME2',
      sizeInBytes: buffer.byteLength,
      dataType: 'Float32Array',
      voxelManager,
      FrameOfReferenceUID: geom.frame_of_reference_uid,
    };
  })();
  return { promise, cancelFn: undefined, decache: undefined };
}

function metadataProvider(type, imageId) {
  if (typeof imageId !== 'string' || !imageId.startsWith(`${SCHEME}:`) || !state.geom) return undefined;
  const { k } = parseImageId(imageId);
  const g = state.geom;
  const [, rows, columns] = g.shape;
  switch (type) {
    case 'imagePlaneModule':
      return {
        frameOfReferenceUID: g.frame_of_reference_uid,
        rows,
        columns,
        imageOrientationPatient: g.orientation,
        rowCosines: g.orientation.slice(0, 3),
        columnCosines: g.orientation.slice(3, 6),
        imagePositionPatient: g.positions[k],
        pixelSpacing: g.pixel_spacing,
        rowPixelSpacing: g.pixel_spacing[0],
        columnPixelSpacing: g.pixel_spacing[1],
        sliceThickness: g.slice_spacing,
        spacingBetweenSlices: g.slice_spacing,
      };
    case 'imagePixelModule':
      return {
        samplesPerPixel: 1, photometricInterpretation: 'MONOCHROME2', rows, columns,
        bitsAllocated: 32, bitsStored: 32, highBit: 31, pixelRepresentation: 1,
      };
    case 'generalSeriesModule':
      return {
        modality: g.modality, seriesInstanceUID: g.series_instance_uid, studyInstanceUID: g.study_instance_uid,
      };
    case 'generalImageModule':
      return { instanceNumber: k + 1 };
    case 'voiLutModule':
      return { windowCenter: [g.window.center], windowWidth: [g.window.width] };
    case 'modalityLutModule':
      return { rescaleSlope: 1, rescaleIntercept: 0 };
    default:
      return undefined;
  }
}

// ------------------------------------------------------------------ geometry (screen ↔ voxel)

const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];

/** Continuous voxel (x = column, y = row) of a world (LPS mm) point on slice k; voxel centres are integers. */
function worldToVoxel(world, k) {
  const g = state.geom;
  const p = g.positions[k];
  const d = [world[0] - p[0], world[1] - p[1], world[2] - p[2]];
  return [dot(d, g.orientation.slice(0, 3)) / g.pixel_spacing[1], dot(d, g.orientation.slice(3, 6)) / g.pixel_spacing[0]];
}

/** World (LPS mm) point of continuous voxel (x, y) on slice k. */
function voxelToWorld(x, y, k) {
  const g = state.geom;
  const p = g.positions[k];
  const r = g.orientation.slice(0, 3);
  const c = g.orientation.slice(3, 6);
  const dc = g.pixel_spacing[1];
  const dr = g.pixel_spacing[0];
  return [0, 1, 2].map((a) => p[a] + r[a] * dc * x + c[a] * dr * y);
}

function viewport() {
  const engine = window.ainode.engine;
  return engine ? engine.getViewport(VIEWPORT_ID) : null;
}

/** Canvas point (CSS px relative to the viewport element) of a mouse event. */
function canvasPoint(event) {
  const rect = $('viewport').getBoundingClientRect();
  return [event.clientX - rect.left, event.clientY - rect.top];
}

/** The voxel (x, y, k) under a canvas point, or null outside the image. */
function voxelAt(canvas) {
  const vp = viewport();
  const k = vp.getCurrentImageIdIndex();
  const [fx, fy] = worldToVoxel(vp.canvasToWorld(canvas), k);
  const x = Math.floor(fx + 0.5);
  const y = Math.floor(fy + 0.5);
  const [, rows, columns] = state.geom.shape;
  if (x < 0 || y < 0 || x >= columns || y >= rows) return null;
  return [x, y, k];
}

function voxelToCanvas(x, y, k) {
  return viewport().worldToCanvas(voxelToWorld(x, y, k));
}

Object.assign(window.ainode, { voxelAt, voxelToCanvas, worldToVoxel, voxelToWorld, viewport });

// ------------------------------------------------------------------ drawing of prompts

function svg(tag, attrs) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

function drawPrompts() {
  const layer = $('prompts-layer');
  layer.replaceChildren();
  const vp = viewport();
  if (!vp || !state.geom) return;
  const k = vp.getCurrentImageIdIndex();
  const boxRect = (a, b, attrs) => {
    const p = voxelToCanvas(Math.min(a[0], b[0]) - 0.5, Math.min(a[1], b[1]) - 0.5, k);
    const q = voxelToCanvas(Math.max(a[0], b[0]) + 0.5, Math.max(a[1], b[1]) + 0.5, k);
    return svg('rect', {
      x: Math.min(p[0], q[0]), y: Math.min(p[1], q[1]), width: Math.abs(q[0] - p[0]), height: Math.abs(q[1] - p[1]),
      fill: 'none', 'stroke-width': 2, ...attrs,
    });
  };
  for (const pr of state.prompts) {
    if (pr.kind === 'point' && pr.ijk[2] === k) {
      const [cx, cy] = voxelToCanvas(pr.ijk[0], pr.ijk[1], k);
      layer.append(svg('circle', {
        cx, cy, r: 5, fill: pr.positive ? '#3c3' : '#e33', stroke: '#fff', 'stroke-width': 1.5,
        class: pr.positive ? 'point positive' : 'point negative',
      }));
    } else if (pr.kind === 'box' && pr.ijk[0][2] === k) {
      layer.append(boxRect(pr.ijk[0], pr.ijk[1], { stroke: pr.positive ? '#3c3' : '#e33', class: 'box' }));
    }
  }
  if (state.drag && state.drag.moved) {
    const a = state.drag.start;
    const b = state.drag.current;
    if (a && b) layer.append(boxRect(a, b, { stroke: '#ff0', 'stroke-dasharray': '4 3', class: 'rubber' }));
  }
  const g = state.geom;
  $('slice-info').textContent = `slice ${k + 1}/${g.shape[0]} (k=${k}) · W ${Math.round(currentWindow().width)} / L ${Math.round(currentWindow().center)}`;
}

function currentWindow() {
  const vp = viewport();
  const { voiRange } = vp.getProperties();
  if (!voiRange) return state.geom.window;
  return { width: voiRange.upper - voiRange.lower, center: (voiRange.upper + voiRange.lower) / 2 };
}

// ------------------------------------------------------------------ series list and sessions

const HIDDEN_MODALITIES = new Set(['SEG', 'SR', 'PR', 'KO', 'RTSTRUCT', 'RTPLAN', 'REG', 'DOC']);

function tagValue(item, tag) {
  const e = item[tag];
  if (!e || !e.Value || !e.Value.length) return '';
  const v = e.Value[0];
  if (v && typeof v === 'object') return v.Alphabetic || '';
  return String(v);
}

async function loadSeriesList() {
  const list = $('series');
  list.replaceChildren();
  let items;
  try {
    const r = await api('/dicomweb/series?includefield=0008103E,00080060,00080020,00201209,0020000D', {
      headers: { Accept: 'application/dicom+json' },
    });
    items = r.status === 204 ? [] : await r.json();
  } catch (err) {
    setStatus(`Series list: ${err.message}`, true);
    return;
  }
  const shown = items.filter((it) => !HIDDEN_MODALITIES.has(tagValue(it, '00080060')));
  if (!shown.length) {
    const li = document.createElement('li');
    li.textContent = 'No image series in the node yet (send one by C-STORE or STOW-RS).';
    list.append(li);
  }
  for (const it of shown) {
    const uid = tagValue(it, '0020000E');
    const li = document.createElement('li');
    li.dataset.uid = uid;
    li.dataset.study = tagValue(it, '0020000D');
    const title = document.createElement('div');
    const desc = tagValue(it, '0008103E') || '(no description)';
    title.textContent = `${tagValue(it, '00080060')} · ${desc} · ${tagValue(it, '00201209') || '?'} images`;
    const sub = document.createElement('div');
    sub.className = 'uid';
    sub.textContent = uid;
    li.append(title, sub);
    li.addEventListener('click', () => openSeries(uid, li.dataset.study, desc));
    list.append(li);
  }
  setStatus(`${shown.length} series`);
}

async function openSeries(uid, study, description) {
  if (state.busy) return;
  state.busy = true;
  for (const li of $('series').children) li.classList.toggle('active', li.dataset.uid === uid);
  setStatus('Opening the series…');
  try {
    if (state.session) {
      await api(`/v1/sessions/${state.session.id}`, { method: 'DELETE' }).catch(() => {});
    }
    const body = { series: { series_instance_uid: uid, study_instance_uid: study || undefined },
      mode: $('mode').value, segment: { label: $('label').value || 'Segment' } };
    const r = await api('/v1/sessions', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    });
    const session = await r.json();
    const geom = await (await api(`/v1/sessions/${session.id}/slices`)).json();
    state.session = session;
    state.geom = geom;
    state.prompts = [];
    state.history = [];
    state.voxelCount = 0;
    state.lastCommit = null;
    state.imageIds = geom.positions.map((_, k) => `${SCHEME}:${session.id}:${k}`);
    await showStack(Math.floor(geom.shape[0] / 2));
    $('series-title').textContent = `${description} — ${geom.shape[2]}×${geom.shape[1]}×${geom.shape[0]}`;
    renderResult();
    setStatus('Click inside the object (or draw a box) to segment it.');
  } catch (err) {
    setStatus(`Open: ${err.message}`, true);
  } finally {
    state.busy = false;
    updateButtons();
  }
}

async function showStack(k) {
  const vp = viewport();
  if (state.segmentationId) {
    segmentation.removeAllSegmentationRepresentations();
    segmentation.removeAllSegmentations();
    state.segmentationId = null;
  }
  await vp.setStack(state.imageIds, k);
  vp.setProperties({ voiRange: csUtils.windowLevel.toLowHighRange(state.geom.window.width, state.geom.window.center) });
  vp.resetCamera();
  vp.render();
  // The labelmap: one derived 8-bit image per slice, same geometry as the slice it refers to.
  const labelmaps = imageLoader.createAndCacheDerivedLabelmapImages(state.imageIds);
  state.labelmapIds = labelmaps.map((im) => im.imageId);
  state.sliceCounts = new Array(state.labelmapIds.length).fill(0);
  const segmentationId = `ainode-${state.session.id}`;
  segmentation.addSegmentations([{
    segmentationId,
    representation: { type: ToolEnums.SegmentationRepresentations.Labelmap, data: { imageIds: state.labelmapIds } },
    config: { label: state.session.label, segments: { 1: { label: state.session.label, active: true } } },
  }]);
  await segmentation.addLabelmapRepresentationToViewport(VIEWPORT_ID, [{ segmentationId }]);
  state.segmentationId = segmentationId;
  drawPrompts();
}

// ------------------------------------------------------------------ prompts

function promptBody(pr) {
  if (pr.kind === 'point') return { points: [{ ijk: pr.ijk, positive: pr.positive }] };
  return { boxes: [{ ijk: pr.ijk, positive: pr.positive }] };
}

/** Writes a packbits mask (slices, rows, columns; C order) into the labelmap; returns its voxel count. */
function applyMask(bits, shape) {
  const [n, rows, columns] = shape;
  const per = rows * columns;
  let count = 0;
  const modified = [];
  const shown = state.sliceCounts || (state.sliceCounts = new Array(n).fill(0));
  for (let k = 0; k < n; k++) {
    // Skip slices empty before and after (scanning the packed bytes only; large series have many).
    let any = false;
    for (let b = Math.floor((k * per) / 8), end = Math.ceil(((k + 1) * per) / 8); b < end && !any; b++) any = bits[b] !== 0;
    if (!any && !shown[k]) continue;
    const image = cache.getImage(state.labelmapIds[k]);
    const data = image.voxelManager.getScalarData();
    let changed = false;
    let sliceCount = 0;
    for (let p = 0; p < per; p++) {
      const idx = k * per + p;
      const v = (bits[idx >> 3] >> (7 - (idx & 7))) & 1;
      if (data[p] !== v) {
        data[p] = v;
        changed = true;
      }
      sliceCount += v;
    }
    count += sliceCount;
    shown[k] = sliceCount;
    if (changed) modified.push(k);
  }
  segmentation.triggerSegmentationEvents.triggerSegmentationDataModified(state.segmentationId, modified);
  return count;
}

/** Voxels set in the labelmap (what the viewer shows), per slice. */
function overlayCounts() {
  return state.labelmapIds.map((id) => {
    const data = cache.getImage(id).voxelManager.getScalarData();
    let c = 0;
    for (let i = 0; i < data.length; i++) if (data[i]) c++;
    return c;
  });
}
window.ainode.overlayCounts = overlayCounts;
window.ainode.cacheImage = (imageId) => cache.getImage(imageId);

async function maskCall(path, body) {
  const t0 = performance.now();
  const r = await api(path, body === undefined ? { method: 'POST' } : {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
  });
  const bits = new Uint8Array(await r.arrayBuffer());
  const t1 = performance.now();
  const shape = r.headers.get('X-Mask-Shape').split(',').map(Number);
  const apiCount = Number(r.headers.get('X-Voxel-Count'));
  const count = applyMask(bits, shape);
  const tApplied = performance.now();
  // The overlay is on screen at the next frame after the labelmap was modified.
  await new Promise((resolve) => requestAnimationFrame(() => resolve()));
  const t2 = performance.now();
  const ms = t2 - t0;
  state.latencies.push(ms);
  state.voxelCount = count;
  state.lastResponse = {
    step: Number(r.headers.get('X-Step')), voxel_count: apiCount, shown: count, ms,
    request_ms: t1 - t0, display_ms: t2 - t1, apply_ms: tApplied - t1,
  };
  if (count !== apiCount) setStatus(`Mask mismatch: API ${apiCount} voxels, shown ${count}.`, true);
  return state.lastResponse;
}

async function sendPrompt(pr) {
  if (!state.session || state.busy) return;
  state.busy = true;
  updateButtons();
  state.prompts.push(pr);
  drawPrompts();
  setStatus('Segmenting…');
  const body = { ...promptBody(pr), mode: $('mode').value };
  state.lastRequest = body;
  try {
    const res = await maskCall(`/v1/sessions/${state.session.id}/prompts?output=bin`, body);
    state.history.push(1);
    setStatus(`Step ${res.step}: ${res.voxel_count} voxels in ${Math.round(res.ms)} ms.`);
  } catch (err) {
    state.prompts.pop();
    handleSessionError(err, 'Prompt');
  } finally {
    state.busy = false;
    updateButtons();
    drawPrompts();
    renderResult();
  }
}

async function undoOrReset(what) {
  if (!state.session || state.busy) return;
  state.busy = true;
  updateButtons();
  try {
    const res = await maskCall(`/v1/sessions/${state.session.id}/${what}?output=bin`);
    if (what === 'undo') {
      state.prompts.splice(state.prompts.length - (state.history.pop() || 1));
    } else {
      state.prompts = [];
      state.history = [];
    }
    setStatus(`${what === 'undo' ? 'Undone' : 'Reset'}: step ${res.step}, ${res.voxel_count} voxels.`);
  } catch (err) {
    handleSessionError(err, what);
  } finally {
    state.busy = false;
    updateButtons();
    drawPrompts();
    renderResult();
  }
}

async function commit() {
  if (!state.session || state.busy) return;
  state.busy = true;
  updateButtons();
  setStatus('Writing the SEG and delivering it…');
  try {
    const label = $('label').value.trim();
    const body = label ? { segment: { label } } : {};
    const r = await api(`/v1/sessions/${state.session.id}/commit`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    });
    state.lastCommit = await r.json();
    const deliveries = Object.entries(state.lastCommit.deliveries || {}).map(([k, v]) => `${k}: ${v.state}`);
    setStatus(`Committed: SEG ${state.lastCommit.seg_sop_instance_uid || ''} ${deliveries.length ? `(${deliveries.join(', ')})` : '(no destination)'}`);
    followDeliveries(state.lastCommit.id);
  } catch (err) {
    handleSessionError(err, 'Commit');
  } finally {
    state.busy = false;
    updateButtons();
    renderResult();
  }
}

/** Polls the committed result until no delivery is pending any more (or a minute passed). */
async function followDeliveries(id) {
  for (let i = 0; i < 30; i++) {
    const c = state.lastCommit;
    if (!c || c.id !== id) return;
    const pending = Object.values(c.deliveries || {}).some((d) => d.state === 'pending');
    if (!pending) return;
    await new Promise((resolve) => setTimeout(resolve, 2000));
    try {
      const fresh = await (await api(`/v1/segmentations/${id}`)).json();
      if (state.lastCommit && state.lastCommit.id === id) {
        state.lastCommit = { ...state.lastCommit, deliveries: fresh.deliveries };
        renderResult();
        const states = Object.entries(fresh.deliveries || {}).map(([k, v]) => `${k}: ${v.state}`);
        if ($('status').textContent.startsWith('Committed:')) { // unless the user moved on
          setStatus(`Committed: SEG ${state.lastCommit.seg_sop_instance_uid || ''} (${states.join(', ')})`);
        }
      }
    } catch {
      return;
    }
  }
}

function handleSessionError(err, what) {
  if (err.status === 410 || err.status === 404) {
    setStatus(`${what}: ${err.message} Pick the series again to start a new session.`, true);
    state.session = null;
  } else {
    setStatus(`${what}: ${err.message}`, true);
  }
}

function renderResult() {
  const dl = $('result');
  dl.replaceChildren();
  const add = (k, v) => {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    if (v instanceof Node) dd.append(v); else dd.textContent = v;
    dl.append(dt, dd);
  };
  if (!state.session) return;
  add('session', state.session.id);
  add('voxels', String(state.voxelCount));
  add('prompts', String(state.prompts.length));
  if (state.lastResponse) add('latency', `${Math.round(state.lastResponse.ms)} ms`);
  const c = state.lastCommit;
  if (c) {
    add('result', c.id);
    add('SEG', c.seg_sop_instance_uid || '-');
    if (c.links && c.links.seg) {
      const a = document.createElement('a');
      a.href = c.links.seg;
      a.textContent = 'download';
      a.addEventListener('click', async (ev) => { // the token, when one is needed, goes in a header
        if (!state.token) return;
        ev.preventDefault();
        const blob = await (await api(c.links.seg)).blob();
        const url = URL.createObjectURL(blob);
        const tmp = document.createElement('a');
        tmp.href = url;
        tmp.download = 'segmentation.dcm';
        tmp.click();
        URL.revokeObjectURL(url);
      });
      add('file', a);
    }
    for (const [k, v] of Object.entries(c.deliveries || {})) add(`→ ${k}`, v.state);
  }
}

function updateButtons() {
  const open = !!state.session && !state.busy;
  $('undo').disabled = !open || !state.history.length;
  $('reset').disabled = !open || !state.prompts.length;
  $('commit').disabled = !open || state.voxelCount === 0;
  document.body.dataset.busy = state.busy ? '1' : '0';
}

// ------------------------------------------------------------------ mouse input

function tool() {
  return document.querySelector('input[name="tool"]:checked').value;
}

function onMouseDown(event) {
  if (event.button !== 0 || !state.session || state.busy) return;
  const start = voxelAt(canvasPoint(event));
  state.drag = { start, current: start, x: event.clientX, y: event.clientY, moved: false, shift: event.shiftKey };
  event.preventDefault();
}

function onMouseMove(event) {
  const d = state.drag;
  if (!d) return;
  if (Math.abs(event.clientX - d.x) + Math.abs(event.clientY - d.y) > 4) d.moved = true;
  if (tool() === 'box' && d.moved) {
    d.current = voxelAt(canvasPoint(event)) || d.current;
    drawPrompts();
  }
}

function onMouseUp(event) {
  const d = state.drag;
  state.drag = null;
  if (!d || event.button !== 0) return;
  const t = tool();
  if (t === 'box') {
    const end = voxelAt(canvasPoint(event));
    if (!d.start || !end) {
      setStatus('Draw the box inside the image.', true);
      drawPrompts();
      return;
    }
    if (d.start[0] === end[0] || d.start[1] === end[1]) {
      setStatus('The box is empty; drag across the object.', true);
      drawPrompts();
      return;
    }
    const x0 = Math.min(d.start[0], end[0]);
    const y0 = Math.min(d.start[1], end[1]);
    const x1 = Math.max(d.start[0], end[0]);
    const y1 = Math.max(d.start[1], end[1]);
    const k = d.start[2];
    sendPrompt({ kind: 'box', positive: !d.shift, ijk: [[x0, y0, k], [x1, y1, k]] });
    return;
  }
  if (d.moved) return;
  if (!d.start) {
    setStatus('Click inside the image.', true);
    return;
  }
  sendPrompt({ kind: 'point', positive: t === 'positive' && !d.shift, ijk: d.start });
}

// ------------------------------------------------------------------ start-up

async function start() {
  csInit();
  toolsInit();
  imageLoader.registerImageLoader(SCHEME, loadImage);
  metaData.addProvider(metadataProvider, 10000);

  const element = $('viewport');
  const engine = new RenderingEngine(ENGINE_ID);
  window.ainode.engine = engine;
  engine.enableElement({
    viewportId: VIEWPORT_ID, type: Enums.ViewportType.STACK, element,
    defaultOptions: { background: [0, 0, 0] },
  });

  for (const T of [StackScrollTool, WindowLevelTool, PanTool, ZoomTool]) addTool(T);
  const group = ToolGroupManager.createToolGroup(TOOLGROUP_ID);
  for (const T of [StackScrollTool, WindowLevelTool, PanTool, ZoomTool]) group.addTool(T.toolName);
  const { MouseBindings, KeyboardBindings } = ToolEnums;
  group.setToolActive(StackScrollTool.toolName, { bindings: [{ mouseButton: MouseBindings.Wheel }] });
  group.setToolActive(WindowLevelTool.toolName, { bindings: [{ mouseButton: MouseBindings.Secondary }] });
  group.setToolActive(PanTool.toolName, { bindings: [{ mouseButton: MouseBindings.Auxiliary }] });
  group.setToolActive(ZoomTool.toolName, {
    bindings: [{ mouseButton: MouseBindings.Wheel, modifierKey: KeyboardBindings.Ctrl }],
  });
  group.addViewport(VIEWPORT_ID, ENGINE_ID);

  element.addEventListener('contextmenu', (ev) => ev.preventDefault()); // right drag windows
  element.addEventListener(Enums.Events.IMAGE_RENDERED, drawPrompts);
  element.addEventListener('mousedown', onMouseDown, true);
  window.addEventListener('mousemove', onMouseMove);
  window.addEventListener('mouseup', onMouseUp);

  $('undo').addEventListener('click', () => undoOrReset('undo'));
  $('reset').addEventListener('click', () => undoOrReset('reset'));
  $('commit').addEventListener('click', commit);
  $('refresh').addEventListener('click', loadSeriesList);
  $('token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    state.token = $('token').value.trim();
    sessionStorage.setItem('ainode.token', state.token);
    $('auth').hidden = true;
    loadSeriesList();
  });

  window.addEventListener('pagehide', () => {
    if (!state.session) return;
    const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
    fetch(`/v1/sessions/${state.session.id}`, { method: 'DELETE', headers, keepalive: true }).catch(() => {});
  });

  window.ainode.ready = true;
  await loadSeriesList();
  updateButtons();
}

start().catch((err) => {
  setStatus(`Viewer failed to start: ${err.message}`, true);
  console.error(err);
});
