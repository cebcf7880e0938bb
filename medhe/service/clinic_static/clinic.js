// The clinic page. It talks to the local medhe process only (the Content-Security-Policy allows no
// other address); that process holds the keys, encrypts, and sends ciphertexts to the server.
"use strict";

// This run's access token: from the link `medhe clinic` printed (then taken out of the address
// bar and history), kept for this tab only; every /api request carries it.
const TOKEN = (() => {
  const given = new URLSearchParams(location.search).get("token");
  if (given) {
    sessionStorage.setItem("medhe-clinic-token", given);
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem("medhe-clinic-token") || "";
})();
const HEADERS = { "x-medhe-clinic": TOKEN };
const STEPS = [
  ["preprocess", "Read, crop and resize (this computer)"],
  ["encrypt", "Encrypt (this computer)"],
  ["upload", "Ciphertext to the server and back (network, queue)"],
  ["evaluate", "Encrypted evaluation (server)"],
  ["decrypt", "Decrypt the diagnosis (this computer)"],
];
const POLL_MS = 400;

const state = {
  models: [], model: null, tasks: new Map(), localRows: [], selected: null,
  sortKey: null, sortDir: 1, polling: false, keysTask: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-") || key.startsWith("aria-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(message) {
  $("errors").append(el("p", { textContent: message }));
}

function clearErrors() { $("errors").replaceChildren(); }

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...HEADERS, ...(options.headers || {}) } });
  } catch (err) {
    throw new Error("The local medhe clinic process does not answer: is `medhe clinic` still running?");
  }
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  if (!response.ok) {
    const error = new Error((body && body.message) || `${response.status} ${response.statusText}`);
    error.code = body && body.error;
    error.task = body && body.task;  // a file refused by the local process is still a (failed) study
    throw error;
  }
  return body;
}

function size(bytes) {
  if (bytes >= 2 ** 20) return `${(bytes / 2 ** 20).toFixed(0)} MiB`;
  return bytes >= 1024 ? `${(bytes / 1024).toFixed(0)} KiB` : `${bytes} bytes`;
}
function seconds(s) { return s === undefined ? "" : s.toFixed(s < 0.1 ? 3 : 2); }

// --- server and models ---------------------------------------------------------------------------
async function loadStatus() {
  $("retry").hidden = true;
  let status;
  try {
    status = await api("/api/status");
  } catch (err) {
    $("server-status").textContent = err.message;
    $("retry").hidden = false;
    return;
  }
  const server = status.server;
  if (!server.reachable) {
    $("server-status").textContent = `Diagnosis server ${server.url}: not available`;
    showError(server.error ? server.error.message : `The diagnosis server at ${server.url} cannot be reached.`);
    $("retry").hidden = false;
    return;
  }
  $("server-status").textContent = `Diagnosis server ${server.url}: connected`;
  state.models = status.models;
  const select = $("model");
  const previous = state.model;
  select.replaceChildren(...status.models.map((m) => el("option", {
    value: m.name, textContent: `${m.name} (${m.class_names.join(" / ")})${m.mode === "latency" ? "" : " - throughput mode"}`,
    disabled: m.mode !== "latency",
  })));
  const usable = status.models.filter((m) => m.mode === "latency");
  state.model = (usable.find((m) => m.name === previous) || usable[0] || {}).name || null;
  if (state.model) select.value = state.model;
  select.disabled = usable.length === 0;
  if (usable.length === 0) showError("This server hosts no model that diagnoses one image at a time.");
  renderModel();
}

function currentModel() { return state.models.find((m) => m.name === state.model); }

function renderModel() {
  const model = currentModel();
  const info = $("model-info");
  info.replaceChildren();
  $("accept-model").hidden = true;
  $("prepare-keys").disabled = !model;
  if (!model) return;
  const facts = [
    ["Classes", model.class_names.join(", ")],
    ["Input", `${model.input_shape.slice(1).join(" x ")} px, ${model.input_shape[0]} channel(s)`],
    ["Weights on the server", model.weights === "encrypted" ? "encrypted (the server cannot read them)" : "in clear (the model owner's choice)"],
    ["Model digest", model.spec_digest.slice(0, 16)],
  ];
  for (const [term, value] of facts) info.append(el("dt", { textContent: term }), el("dd", { textContent: value }));
  const keys = $("keys-state");
  if (model.keys === "ready") {
    keys.textContent = "Keys ready on this computer (made earlier; reused).";
    $("prepare-keys").textContent = "Check keys";
  } else if (model.keys === "changed") {
    keys.textContent = "This model changed on the server since this clinic's keys were made.";
    keys.className = "failed";
    $("accept-model").hidden = false;
    return;
  } else {
    keys.textContent = "No keys yet: they are made on this computer on first use (a few seconds), and the evaluation keys are uploaded once.";
    $("prepare-keys").textContent = "Prepare keys";
  }
  keys.className = "";
}

async function prepareKeys(acceptNew) {
  const model = currentModel();
  if (!model) return;
  clearErrors();
  $("prepare-keys").disabled = true;
  $("accept-model").hidden = true;
  $("keys-progress").hidden = false;
  $("keys-state").textContent = "Setting up keys…";
  try {
    const task = await api(`/api/models/${encodeURIComponent(model.name)}/keys?accept_new=${acceptNew ? "true" : "false"}`,
      { method: "POST", headers: HEADERS });
    state.keysTask = task.id;
    await waitForKeys(task.id);
  } catch (err) {
    showError(err.message);
    $("keys-progress").hidden = true;
    $("prepare-keys").disabled = false;
  }
}

async function waitForKeys(taskId) {
  for (;;) {
    const task = await api(`/api/tasks/${taskId}`);
    $("keys-state").textContent = task.message || "Setting up keys…";
    if (task.state === "done" || task.state === "failed") {
      $("keys-progress").hidden = true;
      $("prepare-keys").disabled = false;
      if (task.state === "failed") {
        showError(task.error.message);
        if (task.error.code === "model_changed") $("accept-model").hidden = false;
      } else {
        await loadStatus();
        const r = task.result;
        $("keys-state").textContent = `Keys ready: key id ${r.key_id.slice(0, 12)}, evaluation keys ${size(r.evaluation_keys_bytes)} (uploaded once), made and kept on this computer in ${seconds(task.timings_s.keys)} s.`;
      }
      return task;
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

// --- adding images -------------------------------------------------------------------------------
// Entries must be taken from the drop event before the first await: the browser empties the list.
function entriesOf(dataTransfer) {
  return [...dataTransfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
}

async function filesFromEntries(entries) {
  const files = [];
  async function walk(entry) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      files.push({ file, name: entry.fullPath.replace(/^\//, "") });  // the folder path tells series apart
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (batch.length === 0) break;
        for (const child of batch) await walk(child);
      }
    }
  }
  for (const entry of entries) await walk(entry);
  return files;
}

// In a folder, leave out what is surely no image (DICOM files often have no suffix, or a UID for a
// name: those go to the local process, which reads them by content and names any it cannot).
const NOT_IMAGES = /\.(txt|pdf|xml|json|csv|html?|md|ini|log|zip|exe|db)$/i;
function skipInFolder(name) {
  const base = name.split("/").pop();
  return base.startsWith(".") || base.toUpperCase() === "DICOMDIR" || NOT_IMAGES.test(base);
}

async function addFiles(fileList, fromFolder) {
  clearErrors();
  const model = currentModel();
  if (!model) { showError("Choose a model first (the diagnosis server has none available)."); return; }
  const files = [...fileList].map((f) => (f.file ? f : { file: f, name: f.webkitRelativePath || f.name }))
    .filter((f) => !fromFolder || !skipInFolder(f.name));
  for (const { file, name } of files) {
    try {
      const task = await api(`/api/studies?model=${encodeURIComponent(model.name)}&name=${encodeURIComponent(name)}`,
        { method: "POST", headers: { ...HEADERS, "content-type": "application/octet-stream" }, body: file });
      state.tasks.set(task.id, task);
      if (state.selected === null || files.length === 1) state.selected = task.id;
    } catch (err) {
      const row = err.task || { id: `local${state.localRows.length + 1}`, kind: "study", name, model: model.name,
        state: "failed", error: { code: err.code, message: err.message }, timings_s: {}, result: null,
        metadata: {}, preview: "" };
      if (!err.task) state.localRows.push(row);
      state.tasks.set(row.id, row);
      state.selected = row.id;
      showError(err.message);
      if (err.code === "model_changed") { await loadStatus(); break; }
    }
    render();
    startPolling();
  }
}

function startPolling() {
  if (state.polling) return;
  state.polling = true;
  const tick = async () => {
    let reached = true;
    try {
      await refreshTasks();
    } catch (err) { reached = false; }
    render();
    const busy = [...state.tasks.values()].some((t) => t.state === "queued" || t.state === "running");
    if (busy && reached) setTimeout(tick, POLL_MS);
    else {
      state.polling = false;
      if (!reached) showError("The local medhe clinic process stopped answering: restart `medhe clinic` and reload this page.");
    }
  };
  setTimeout(tick, POLL_MS);
}

// The study list without previews (polled); a study's preview is fetched once, when it is shown.
async function refreshTasks() {
  const { tasks } = await api("/api/tasks?previews=false");
  for (const task of tasks) {
    if (task.kind !== "study") continue;
    const known = state.tasks.get(task.id);
    state.tasks.set(task.id, { ...task, preview: known ? known.preview : "" });
  }
}

async function loadPreview(task) {
  if (task.preview || task.previewRequested || task.id.startsWith("local")) return;
  task.previewRequested = true;
  try {
    const full = await api(`/api/tasks/${task.id}`);
    const known = state.tasks.get(task.id);
    if (known) { known.preview = full.preview; renderStudy(); }
  } catch (err) { /* the card shows no preview */ }
}

// --- rendering -----------------------------------------------------------------------------------
function total(task) { return Object.values(task.timings_s || {}).reduce((a, b) => a + b, 0); }

function sortValue(task, key) {
  if (key === "label") return task.result ? task.result.label : "";
  if (key === "probability") return task.result ? task.result.probability : -1;
  if (key === "total") return task.result ? total(task) : -1;
  return task[key] || "";
}

function render() {
  renderTable();
  renderStudy();
}

function statusText(task) {
  if (task.state === "done") return "done";
  if (task.state === "failed") return "failed";
  if (task.state === "queued") return "waiting";
  return task.step ? `${task.step}…` : "running…";
}

function renderTable() {
  let rows = [...state.tasks.values()];
  // Rebuild only when something shown changed, so keyboard focus and selection survive polling.
  const signature = JSON.stringify([state.selected, state.sortKey, state.sortDir,
    rows.map((t) => [t.id, t.state, t.step, t.result && t.result.label])]);
  if (signature === state.tableSignature) return;
  state.tableSignature = signature;
  const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.id : null;
  if (state.sortKey) {
    const key = state.sortKey;
    rows.sort((a, b) => {
      const x = sortValue(a, key), y = sortValue(b, key);
      return (x < y ? -1 : x > y ? 1 : 0) * state.sortDir;
    });
  }
  const body = document.querySelector("#studies tbody");
  body.replaceChildren(...rows.map((task) => {
    const row = el("tr", { tabIndex: 0, class: task.id === state.selected ? "selected" : "", "data-id": task.id,
      "aria-selected": String(task.id === state.selected) });
    row.append(
      el("td", { textContent: task.name }),
      el("td", { textContent: statusText(task), class: task.state === "failed" ? "failed" : "" }),
      el("td", { textContent: task.result ? task.result.label + (atypical(task) ? " (atypical image)" : "")
        : (task.error ? task.error.message : ""), class: task.error ? "failed" : "" }),
      el("td", { textContent: task.result ? task.result.probability.toFixed(3) : "", class: "num" }),
      el("td", { textContent: task.result ? seconds(total(task)) : "", class: "num" }),
      el("td", { textContent: task.model }),
    );
    const select = () => { state.selected = task.id; render(); };
    row.addEventListener("click", select);
    row.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") { event.preventDefault(); select(); } });
    return row;
  }));
  if (focused) {
    const again = body.querySelector(`tr[data-id="${focused}"]`);
    if (again) again.focus();
  }
  for (const th of document.querySelectorAll("#studies th")) {
    const key = th.querySelector("button").dataset.key;
    th.setAttribute("aria-sort", key === state.sortKey ? (state.sortDir > 0 ? "ascending" : "descending") : "none");
  }
  const all = [...state.tasks.values()];
  const done = all.filter((t) => t.state === "done").length;
  const failed = all.filter((t) => t.state === "failed").length;
  $("batch-summary").textContent = all.length ? `${done} of ${all.length} diagnosed${failed ? `, ${failed} failed` : ""}` : "No studies yet.";
}

function renderStudy() {
  const task = state.tasks.get(state.selected);
  $("study").hidden = !task;
  if (!task) return;
  // Rebuild only on a change (the result is a live region: a rebuild would be announced again).
  const signature = JSON.stringify([task.id, task.state, task.step, task.message, task.timings_s,
    Boolean(task.preview), Boolean(task.result)]);
  if (signature === state.studySignature) return;
  state.studySignature = signature;
  if (!task.preview) loadPreview(task);
  $("study-name").textContent = task.name;
  const preview = $("preview");
  preview.hidden = !task.preview;
  if (task.preview) preview.src = task.preview;
  const model = state.models.find((m) => m.name === task.model);
  $("preview-size").textContent = model ? `${model.input_shape.slice(1).join(" x ")} px` : "";
  const metadata = $("metadata");
  metadata.replaceChildren();
  for (const [term, value] of Object.entries(task.metadata || {})) {
    metadata.append(el("dt", { textContent: term }), el("dd", { textContent: value }));
  }
  const steps = $("steps");
  steps.replaceChildren(...STEPS.map(([key, text]) => {
    const time = task.timings_s[key];
    const active = task.state === "running" && task.step === key;
    const item = el("li", { class: time !== undefined ? "done" : active ? "active" : "" });
    item.append(text, " ");
    item.append(el("span", { class: "time", textContent: time !== undefined ? `${seconds(time)} s` : active ? "…" : "" }));
    return item;
  }));
  if (task.state === "running" && task.message) steps.append(el("li", { textContent: task.message, class: "active" }));
  renderResult(task, model);
}

function atypical(task) {
  return Boolean(task.result && task.result.input_check && !task.result.input_check.typical);
}

function renderResult(task, model) {
  const box = $("result");
  box.replaceChildren();
  if (task.state === "failed") {
    box.append(el("p", { class: "failed", textContent: task.error.message }));
    return;
  }
  if (!task.result) return;
  const r = task.result;
  const verdict = el("div", { class: "verdict" });
  verdict.append(
    el("span", { class: "label", id: "result-label", textContent: r.label }),
    el("span", { class: "prob", id: "result-probability", textContent: `probability ${r.probability.toFixed(3)}` }),
    el("span", { class: "hint", textContent: Object.entries(r.probabilities).map(([k, v]) => `${k} ${v.toFixed(3)}`).join(" · ") }),
  );
  box.append(verdict);
  if (r.input_check && r.input_check.uniform) {
    box.append(el("p", { class: "warning", id: "input-warning", role: "alert", textContent:
      "This image is blank (every pixel the same value): there is nothing to diagnose. Check the export." }));
  } else if (atypical(task)) {
    box.append(el("p", { class: "warning", id: "input-warning", role: "alert", textContent:
      "This image is unlike the images the model was trained on (input distance " +
      `${r.input_check.distance.toFixed(0)}, above ${r.input_check.threshold.toFixed(0)}). ` +
      "Check that it is the right kind of scan, the right way up and not inverted: the diagnosis may not hold." }));
  }
  box.append(el("p", { class: "hint", textContent: `Model ${task.model}, digest ${r.spec_digest.slice(0, 16)}; total ${seconds(total(task))} s.` }));
  const privacy = el("div", { class: "privacy", id: "privacy" });
  const list = el("ul");
  list.append(
    el("li", { textContent: "The image never left this computer in clear: the server received one ciphertext " +
      `(${size(r.ciphertext_bytes)}) under key id ${r.key_id.slice(0, 12)}.` }),
    el("li", { textContent: "The diagnosis was computed encrypted and decrypted here: the server never saw it." }),
    el("li", { textContent: r.weights === "encrypted"
      ? "The model's weights were encrypted too: the server did not see them either."
      : "The model's weights are held by the server in clear (the model owner's choice)." }),
  );
  privacy.append(el("strong", { textContent: "What stayed private" }), list);
  box.append(privacy);
}

// --- wiring --------------------------------------------------------------------------------------
async function exportCsv() {
  try {
    const response = await fetch("/api/studies.csv", { headers: HEADERS });
    if (!response.ok) throw new Error(`the local process answered ${response.status}`);
    const link = el("a", { href: URL.createObjectURL(await response.blob()), download: "medhe-studies.csv" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  } catch (err) {
    showError(`Export failed: ${err.message}`);
  }
}

function setup() {
  $("retry").addEventListener("click", () => { clearErrors(); loadStatus(); });
  $("export").addEventListener("click", exportCsv);
  $("model").addEventListener("change", (event) => { state.model = event.target.value; clearErrors(); renderModel(); });
  $("prepare-keys").addEventListener("click", () => prepareKeys(false));
  $("accept-model").addEventListener("click", () => prepareKeys(true));
  $("files").addEventListener("change", (event) => { addFiles(event.target.files, false); event.target.value = ""; });
  $("folder").addEventListener("change", (event) => { addFiles(event.target.files, true); event.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("click", () => $("files").click());
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("files").click(); }
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const entries = entriesOf(event.dataTransfer);
    const plain = [...event.dataTransfer.files];
    const fromFolder = entries.some((entry) => entry.isDirectory);
    addFiles(entries.length ? await filesFromEntries(entries) : plain, fromFolder);
  });
  for (const button of document.querySelectorAll("#studies th button")) {
    button.addEventListener("click", () => {
      const key = button.dataset.key;
      state.sortDir = state.sortKey === key ? -state.sortDir : 1;
      state.sortKey = key;
      renderTable();
    });
  }
  renderTable();
  loadStatus();
  // After a reload: the studies this process already has.
  refreshTasks().then(() => { render(); startPolling(); }).catch(() => {});
}

document.addEventListener("DOMContentLoaded", setup);
