// Keeps a job's live fields current: every element with data-field="<name>" under a root is
// redrawn from the job JSON of GET /train-jobs. The server renders the same fields at first.
import { decimal, number, percent, timestamp, until } from "./admin.js";

function element(tag, text, attributes = {}) {
  const el = Object.assign(document.createElement(tag), attributes);
  el.append(text);
  return el;
}

const adapterHref = (job) => `/admin/adapters/${job.adapter_id}`;

const FIELDS = {
  status(el, job) {
    el.className = `badge badge-${job.status}`;
    const running = job.status === "running";
    el.textContent = job.status + (running && job.cancel_requested ? " · cancelling" : running && job.pause_requested ? " · pausing" : "");
  },
  progress(el, job) {
    const { step, total_steps: total, epoch } = job.progress;
    el.title = `epoch ${epoch}`;
    const bar = el.querySelector(".progress-bar");
    bar.style.width = `${total ? (100 * step) / total : 0}%`;
    bar.className = `progress-bar badge-${job.status}`;
    el.querySelector(".progress-text").textContent = total ? `${number(step)} / ${number(total)}` : "—";
  },
  epoch: (el, job) => (el.textContent = `epoch ${job.progress.epoch}`),
  train_loss: (el, job) => (el.textContent = decimal(job.train_loss)),
  eval_loss: (el, job) => (el.textContent = decimal(job.eval_loss)),
  eval_accuracy: (el, job) => (el.textContent = percent(job.eval_accuracy)),
  estimated_finish(el, job) {
    el.textContent = until(job.estimated_finish);
    el.title = timestamp(job.estimated_finish);
  },
  started_at: (el, job) => (el.textContent = timestamp(job.started_at)),
  finished_at: (el, job) => (el.textContent = timestamp(job.finished_at)),
  adapter: (el, job) =>
    el.replaceChildren(job.adapter_id ? element("a", element("code", job.adapter_id), { href: adapterHref(job) }) : "—"),
  adapter_button: (el, job) =>
    el.replaceChildren(...(job.adapter_id ? [element("a", "View adapter", { href: adapterHref(job), className: "btn" })] : [])),
  error(el, job) {
    el.hidden = !job.error;
    if (job.error) el.replaceChildren(element("strong", job.error.code), `: ${job.error.message}`);
  },
};

export function renderJob(root, job) {
  for (const el of root.querySelectorAll("[data-field]")) FIELDS[el.dataset.field]?.(el, job);
}
