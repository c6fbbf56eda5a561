"""The search canvas: one self-contained HTML page (no external scripts, nothing fetched).

Drag on the canvas to place a box with the chosen label; switch to *draw* to sketch strokes
(each stroke joins the box its first point falls in, and a box with strokes is searched by its
sketch, one without by its label). *Search* posts the canvas to ``POST /projects/{id}/search``
and shows the results' thumbnails (``GET /projects/{id}/tasks/{task}/thumbnail``).

The line above the canvas shows the project's background indexing job
(``GET /projects/{id}/search/index``), polled each second while it is queued or running, so a
user sees why a first search would wait; *Index new tasks* starts one
(``POST /projects/{id}/search/index``).
"""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>boxloop search</title>
<style>
 body { font: 14px sans-serif; margin: 16px; }
 #canvas { border: 1px solid #888; cursor: crosshair; background: #fff; }
 #results img { height: 96px; margin: 4px; border: 1px solid #ccc; }
 #results figure { display: inline-block; margin: 4px; text-align: center; }
 .error { color: #b00; }
</style></head>
<body>
<h1>boxloop search</h1>
<p>Drag to place a box with the chosen label; in <b>draw</b> mode, sketch strokes inside a box
(a box with strokes is searched by its sketch, one without by its label).</p>
<label>project <input id="project" type="number" min="1" value="1" size="4"></label>
<label>label <select id="label"></select></label>
<label><input type="radio" name="mode" value="box" id="mode-box" checked> box</label>
<label><input type="radio" name="mode" value="draw" id="mode-draw"> draw</label>
<label>k <input id="k" type="number" min="1" max="200" value="20" size="4"></label>
<label><input type="checkbox" id="front"> move to the front of the queue</label>
<button id="search">Search</button> <button id="clear">Clear</button>
<button id="index">Index new tasks</button> <span id="index-state"></span>
<div><canvas id="canvas" width="512" height="384"></canvas></div>
<div id="status"></div>
<div id="results"></div>
<script>
const canvas = document.getElementById('canvas');
const ctx = canvas.getContext('2d');
const objects = [];  // {x0, y0, x1, y1 (pixels), label, strokes: [[[x, y], ...]]}
let drag = null, stroke = null;
const $ = (id) => document.getElementById(id);
const mode = () => $('mode-draw').checked ? 'draw' : 'box';
function pos(e) { const r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; }
function redraw() {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (const o of objects) {
    ctx.strokeStyle = '#06c'; ctx.lineWidth = 2;
    ctx.strokeRect(o.x0, o.y0, o.x1 - o.x0, o.y1 - o.y0);
    ctx.fillStyle = '#06c'; ctx.fillText(o.strokes.length ? o.label + ' (sketch)' : o.label, o.x0 + 3, o.y0 + 12);
    ctx.strokeStyle = '#000';
    for (const s of o.strokes) { ctx.beginPath(); s.forEach(([x, y], i) => i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)); ctx.stroke(); }
  }
  if (drag && drag.to) { ctx.strokeStyle = '#999'; ctx.strokeRect(drag.from[0], drag.from[1], drag.to[0] - drag.from[0], drag.to[1] - drag.from[1]); }
  if (stroke) { ctx.strokeStyle = '#000'; ctx.beginPath(); stroke.points.forEach(([x, y], i) => i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)); ctx.stroke(); }
}
canvas.addEventListener('mousedown', (e) => {
  const p = pos(e);
  if (mode() === 'box') { drag = {from: p, to: null}; return; }
  const owner = objects.find(o => p[0] >= o.x0 && p[0] <= o.x1 && p[1] >= o.y0 && p[1] <= o.y1);
  if (owner) stroke = {owner, points: [p]};
});
canvas.addEventListener('mousemove', (e) => {
  if (drag) { drag.to = pos(e); redraw(); }
  if (stroke) { stroke.points.push(pos(e)); redraw(); }
});
window.addEventListener('mouseup', (e) => {
  if (drag && drag.to) {
    const [a, b] = [drag.from, drag.to];
    const o = {x0: Math.max(0, Math.min(a[0], b[0])), y0: Math.max(0, Math.min(a[1], b[1])),
               x1: Math.min(canvas.width, Math.max(a[0], b[0])), y1: Math.min(canvas.height, Math.max(a[1], b[1])),
               label: $('label').value, strokes: []};
    if (o.x1 - o.x0 > 3 && o.y1 - o.y0 > 3) objects.push(o);
  }
  if (stroke && stroke.points.length > 1) stroke.owner.strokes.push(stroke.points);
  drag = null; stroke = null; redraw();
});
$('clear').onclick = () => { objects.length = 0; redraw(); $('results').innerHTML = ''; };
// server text goes in as text, never as HTML (a label or an error may hold '<')
function say(id, text, isError) { $(id).textContent = text; $(id).className = isError ? 'error' : ''; }
const pct = (v, size) => Math.min(100, Math.max(0, 100 * v / size));
function query() {
  return objects.map(o => {
    const box = {x: pct(o.x0, canvas.width), y: pct(o.y0, canvas.height),
                 width: pct(o.x1 - o.x0, canvas.width), height: pct(o.y1 - o.y0, canvas.height)};
    const out = {box, label: o.label};
    if (o.strokes.length) out.strokes = o.strokes.map(s => s.map(([x, y]) => [pct(x, canvas.width), pct(y, canvas.height)]));
    return out;
  });
}
async function loadLabels() {
  const r = await fetch(`/projects/${$('project').value}/search/labels`);
  const body = await r.json();
  if (!r.ok) { say('status', body.error, true); return; }
  $('label').replaceChildren(...body.labels.map(l => new Option(l)));
}
let indexTimer = null;
function describeIndex(s) {
  if (s.state === 'queued') return 'index: job queued';
  if (s.state === 'running') return `index: computing vectors, ${s.done ?? 0} of ${s.todo ?? '?'} images`;
  if (s.state === 'done') return `index: ${s.indexed} tasks` + (s.failed ? ` (${s.failed} unreadable images left out)` : '');
  if (s.state === 'failed') return `index: the job failed: ${s.error}`;
  return 'index: no job since the server started (a search computes what is missing)';
}
async function showIndex(r) {
  const body = await r.json();
  clearTimeout(indexTimer);
  if (!r.ok) { say('index-state', body.error, true); return; }
  say('index-state', describeIndex(body), false);
  $('index-state').dataset.state = body.state;
  if (body.state === 'queued' || body.state === 'running') indexTimer = setTimeout(refreshIndex, 1000);
}
async function refreshIndex() { await showIndex(await fetch(`/projects/${$('project').value}/search/index`)); }
$('index').onclick = async () => { await showIndex(await fetch(`/projects/${$('project').value}/search/index`, {method: 'POST'})); };
$('project').onchange = () => { loadLabels(); refreshIndex(); };
$('search').onclick = async () => {
  const project = $('project').value;
  $('status').textContent = 'searching...';
  const r = await fetch(`/projects/${project}/search`, {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({objects: query(), k: Number($('k').value), front: $('front').checked})});
  const body = await r.json();
  if (!r.ok) { say('status', body.error, true); return; }
  say('status', `${body.results.length} results (${body.index.factory}, ${body.index.count} tasks)` +
    (body.moved_to_front ? ', moved to the front of the queue' : ''), false);
  $('results').innerHTML = body.results.map(h =>
    `<figure><img class="result" alt="task ${h.task}" src="/projects/${project}/tasks/${h.task}/thumbnail">` +
    `<figcaption>task ${h.task} · ${h.score.toFixed(3)}</figcaption></figure>`).join('');
  refreshIndex();
};
loadLabels();
refreshIndex();
</script>
</body></html>
"""
