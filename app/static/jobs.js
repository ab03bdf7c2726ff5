// The job list: every 2 s, refresh each row's status, progress and figures from GET /train-jobs.
// Rows are not added or removed here; when the page's set of jobs changes, a notice offers a refresh.
import { getJSON, poll } from "./admin.js";
import { renderJob } from "./job_fields.js";

const table = document.getElementById("jobs");
const rows = new Map([...table.querySelectorAll("tr[data-job-id]")].map((row) => [row.dataset.jobId, row]));

poll(async () => {
  const page = await getJSON(table.dataset.poll);
  for (const job of page.items) {
    const row = rows.get(job.id);
    if (row) renderJob(row, job);
  }
  const same = page.items.length === rows.size && page.items.every((job) => rows.has(job.id));
  document.getElementById("jobs-changed").hidden = same;
}, 2000);
