// One job, live: its fields every 2 s until it finishes, its loss and accuracy curves and its
// events (fetched incrementally with ?after=), and the cancel button.
import { api, decimal, errorText, flash, getJSON, percent, poll, timestamp } from "./admin.js";
import { drawLineChart } from "./chart.js";
import { renderJob } from "./job_fields.js";

const root = document.getElementById("job");
const id = root.dataset.jobId;
const terminal = root.dataset.terminal.split(",");
const cancelButton = document.getElementById("cancel-job");
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

function showJob(job) {
  renderJob(root, job);
  cancelButton.hidden = terminal.includes(job.status);
}

cancelButton.addEventListener("click", async () => {
  if (!confirm("Cancel this training job?\n\nA queued job stops at once, a running one within a step; no adapter is made.")) return;
  cancelButton.disabled = true;
  const response = await api(`/train-jobs/${id}/cancel`, { method: "POST" });
  if (response.ok) {
    showJob(await response.json());
    flash("Cancel requested.");
  } else {
    flash(`Could not cancel: ${await errorText(response)}`, { kind: "error" });
  }
  cancelButton.disabled = false;
});
showTrainSteps.addEventListener("change", renderEvents);

poll(async () => {
  const job = await getJSON(`/train-jobs/${id}`);
  showJob(job);
  await fetchNewEvents();
  if (events.length !== eventsDrawn) {
    eventsDrawn = events.length;
    drawCharts();
    renderEvents();
  }
  return !terminal.includes(job.status);  // finished: its events are complete, stop asking
}, 2000);
