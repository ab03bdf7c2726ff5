// The new-job form: sends the files and fields as multipart to POST /train-jobs, shows a 422
// beside the field it names (a bad dataset lists its bad lines), and opens the new job on success.
import { api } from "./admin.js";

const form = document.getElementById("new-job");
const submitButton = document.getElementById("submit-job");
const submitStatus = document.getElementById("submit-status");
const formError = document.getElementById("form-error");

const element = (tag, text) => Object.assign(document.createElement(tag), { textContent: text });

function clearErrors() {
  formError.hidden = true;
  for (const slot of form.querySelectorAll("[data-error-for]")) {
    slot.hidden = true;
    slot.replaceChildren();
  }
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

/** Put `message` (and a dataset's bad `lines`) under the named field, or atop the form. */
function showError(field, message, lines = [], stopped = null) {
  const slot = field ? form.querySelector(`[data-error-for="${field}"]`) : null;
  if (!slot) {
    formError.replaceChildren(element("span", field ? `${field}: ${message}` : message));
    formError.hidden = false;
    return formError;
  }
  if (lines.length) {
    const count = `${lines.length} problem${lines.length === 1 ? "" : "s"}`;
    slot.append(element("p", `${count} in this file${stopped ? ` (${stopped}; there may be more)` : ""}:`));
    const list = document.createElement("ul");
    for (const { line, message: problem } of lines) list.append(element("li", line ? `line ${line}: ${problem}` : problem));
    slot.append(list);
  } else {
    slot.append(element("p", message));
  }
  slot.hidden = false;
  form.elements[field]?.setAttribute("aria-invalid", "true");
  slot.closest("details")?.setAttribute("open", "");  // an advanced field: make its error visible
  return slot;
}

function showErrors(response, detail) {
  let shown;
  if (Array.isArray(detail)) {  // FastAPI's shape: [{loc: ["body", field], msg}]
    for (const problem of detail) {
      const slot = showError(String(problem.loc.at(-1)), problem.msg);
      shown ??= slot;
    }
  } else if (detail && typeof detail === "object") {  // a bad dataset file
    shown = showError(detail.field, detail.message, detail.errors, detail.stopped);
  } else {
    shown = showError(null, detail ?? `${response.status} ${response.statusText}`);
  }
  shown.scrollIntoView({ block: "center", behavior: "smooth" });
}

function formData() {
  const data = new FormData(form);
  for (const [name, value] of [...data.entries()]) {
    // Blank fields are left out so the server's defaults apply; a file input with no file chosen
    // still submits an empty nameless file, which is not an upload.
    if (value === "" || (value instanceof File && !value.name)) data.delete(name);
  }
  return data;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  submitButton.disabled = true;
  submitStatus.textContent = "Uploading and checking the data…";
  try {
    const response = await api("/train-jobs", { method: "POST", body: formData() });
    if (response.status === 202) {
      const job = await response.json();
      location.assign(`/admin/jobs/${job.id}`);
      return;
    }
    let detail;
    try {
      detail = (await response.json()).detail;
    } catch {
      // not JSON (a proxy's error page): showErrors falls back to the status line
    }
    showErrors(response, detail);
  } catch (error) {
    showError(null, `The request failed: ${error.message}`);
  }
  submitButton.disabled = false;
  submitStatus.textContent = "";
});
