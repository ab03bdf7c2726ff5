// One job, live: its fields every 2 s until it finishes, its loss and accuracy curves and its
// events (fetched incrementally with ?after=), its checkpoints and webhook deliveries, and the
// pause, resume and cancel buttons.
import { api, decimal, errorText, flash, getJSON, number, percent, poll, timestamp } from "./admin.js";
import { drawLineChart } from "./chart.js";
import { renderJob } from "./job_fields.js";

const root = document.getElementById("job");
const id = root.dataset.jobId;
const terminal = root.dataset.terminal.split(",");
const cancelButton = document.getElementById("cancel-job");
const pauseButton = document.getElementById("pause-job");
const resumeButton = document.getElementById("resume-job");
const showTrainSteps = document.getElementById("show-train-events");
const EVENTS_PAGE = 1000;
const events = [];
let eventsDrawn = -1;

async function fetchNewEvents() {
  for (;;) {
    const after = events.length ? events.at(-1).id : 0;
    const batch = await getJSON(`/train-jobs/${id}/events?after=${after}&limit=${EVENTS_PAGE}`);
    events.push(...batch);
    if (batch.length < EVENTS_PAGE) return;
  }
}

function drawCharts() {
  const evals = events.filter((e) => e.kind === "eval");
  const train = events.filter((e) => e.kind === "train").map((e) => [e.step, e.data.loss]);
  const lossDrawn = drawLineChart(document.getElementById("loss-chart"), [
    { name: "train loss", className: "series-train", points: train, dots: train.length <= 30 },
    { name: "eval loss", className: "series-eval", points: evals.map((e) => [e.step, e.data.loss]), dots: true },
  ], { yFormat: decimal });
  document.getElementById("loss-empty").hidden = lossDrawn;
  const accuracyDrawn = drawLineChart(document.getElementById("accuracy-chart"), [
    { name: "eval accuracy", className: "series-accuracy", points: evals.map((e) => [e.step, e.data.accuracy]), dots: true },
  ], { yRange: [0, 1], yFormat: (y) => `${Math.round(y * 100)}%` });
  document.getElementById("accuracy-empty").hidden = accuracyDrawn;
}

function describe(event) {
  const { data } = event;
  if (event.kind === "train") return `loss ${decimal(data.loss)} · epoch ${Number(data.epoch.toFixed(3))}`;
  if (event.kind === "eval") return `eval loss ${decimal(data.loss)} · accuracy ${percent(data.accuracy)}`;
  return data.message;
}

function renderEvents() {
  const shown = events.filter((e) => showTrainSteps.checked || e.kind !== "train").reverse();  // newest first
  const rows = shown.map((event) => {
    const row = document.createElement("tr");
    row.className = `event-${event.kind}`;
    const when = timestamp(event.created_at);
    for (const [text, className, title] of [[event.kind === "message" ? "" : event.step, "num"], [event.kind, ""], [describe(event), ""], [when.slice(11, 19), "nowrap", when]]) {
      row.append(Object.assign(document.createElement("td"), { textContent: text, className, title: title ?? "" }));
    }
    return row;
  });
  document.querySelector("#events tbody").replaceChildren(...rows);
}

function cells(row, values) {
  for (const value of values) {
    const cell = row.insertCell();
    if (value instanceof Node) cell.append(value);
    else cell.textContent = value;
  }
}

function link(href, content, className = "") {
  const a = Object.assign(document.createElement("a"), { href, className });
  a.append(content);
  return a;
}

const code = (text) => Object.assign(document.createElement("code"), { textContent: text });

/** Fill a table's body with one row per item (or show its empty note instead). */
function fillTable(name, items, drawRow) {
  const table = document.getElementById(name);
  table.closest(".table-wrap").hidden = !items.length;
  document.getElementById(`${name}-empty`).hidden = Boolean(items.length);
  table.tBodies[0].replaceChildren(...items.map((item) => {
    const row = document.createElement("tr");
    drawRow(row, item);
    return row;
  }));
}

function renderCheckpoints(checkpoints) {
  fillTable("checkpoints", checkpoints, (row, c) => {
    row.dataset.adapterId = c.adapter_id;
    cells(row, [number(c.step), decimal(c.metrics.eval_loss), percent(c.metrics.eval_accuracy), decimal(c.metrics.train_loss),
      link(`/admin/adapters/${c.adapter_id}`, code(c.adapter_id)), timestamp(c.created_at),
      link(`/admin/playground?adapter=${c.adapter_id}`, "Try in playground", "btn btn-ghost btn-small")]);
    for (const i of [0, 1, 2, 3]) row.cells[i].className = "num";
    row.cells[5].className = "nowrap";
  });
}

function renderDeliveries(deliveries) {
  fillTable("deliveries", deliveries, (row, d) => {
    row.dataset.deliveryId = d.id;
    const when = d.status === "delivered" ? `delivered ${timestamp(d.delivered_at)}`
      : d.status === "pending" ? `next try ${timestamp(d.next_attempt_at)}` : "given up";
    const badge = Object.assign(document.createElement("span"), { className: `badge badge-${d.status}`, textContent: d.status });
    cells(row, [code(d.event_type), code(d.url), badge, number(d.attempts), d.last_error ?? "—", when]);
    row.cells[3].className = "num";
    row.cells[5].className = "nowrap";
  });
}

function showJob(job) {
  renderJob(root, job);
  cancelButton.hidden = terminal.includes(job.status);
  // A running job asked to pause shows "pausing" until its run stops at a step boundary.
  pauseButton.hidden = !(job.status === "queued" || (job.status === "running" && !job.pause_requested));
  resumeButton.hidden = job.status !== "paused";
}

/** A button that POSTs one of the job's actions and shows the job it answers with. */
function action(button, verb, done, question) {
  button.addEventListener("click", async () => {
    if (question && !confirm(question)) return;
    button.disabled = true;
    const response = await api(`/train-jobs/${id}/${verb}`, { method: "POST" });
    if (response.ok) {
      const job = await response.json();
      showJob(job);
      flash(done(job));
    } else {
      flash(`Could not ${verb}: ${await errorText(response)}`, { kind: "error" });
    }
    button.disabled = false;
  });
}

action(cancelButton, "cancel", (job) => (job.status === "cancelled" ? "Cancelled." : "Cancel requested."),
  "Cancel this training job?\n\nA queued or paused job stops at once, a running one within a step; no adapter is made.");
action(pauseButton, "pause", (job) => (job.status === "paused" ? "Paused." : "Pause requested: the job stops at its next step."));
action(resumeButton, "resume", () => "Resumed: the job is queued again.");
showTrainSteps.addEventListener("change", renderEvents);

// The run prunes its checkpoints just after the job ends: a few more rounds show that.
let roundsAfterEnd = 3;

poll(async () => {
  const job = await getJSON(`/train-jobs/${id}`);
  showJob(job);
  const [checkpoints, deliveries] = await Promise.all(
    [getJSON(`/train-jobs/${id}/checkpoints`), getJSON(`/train-jobs/${id}/webhooks`)]);
  renderCheckpoints(checkpoints);
  renderDeliveries(deliveries);
  await fetchNewEvents();
  if (events.length !== eventsDrawn) {
    eventsDrawn = events.length;
    drawCharts();
    renderEvents();
  }
  if (!terminal.includes(job.status)) return true;
  // Finished: its events are complete; deliveries may still be on their way.
  return deliveries.some((d) => d.status === "pending") || roundsAfterEnd-- > 0;
}, 2000);
