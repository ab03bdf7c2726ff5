// The playground: one prompt through the chosen adapter and through the base model at the same
// time, streamed (server-sent events read from fetch) or whole, shown side by side.
import { api, errorText, getJSON, number } from "./admin.js";

const form = document.getElementById("playground");
const select = document.getElementById("adapter");
const search = document.getElementById("adapter-search");
const pickerNote = document.getElementById("picker-note");
const preview = document.getElementById("template-preview");
const applyTemplate = document.getElementById("apply_template");
const runButton = document.getElementById("run");
const runError = document.getElementById("run-error");
const panels = { adapter: document.getElementById("out-adapter"), base: document.getElementById("out-base") };
const SEARCH_LIMIT = 100;

const chosenTemplate = () => select.selectedOptions[0]?.dataset.template ?? "";

function showTemplate() {
  const template = chosenTemplate();
  preview.textContent = template || "(none: the prompt is used as it is)";
  applyTemplate.disabled = !template;
}

function option(adapter) {
  const choice = new Option(`${adapter.name} · ${adapter.id}`, adapter.id);
  choice.dataset.template = adapter.template ?? "";
  return choice;
}

// Only the newest adapters are in the page; the search box asks the API for any others.
let searchTimer;
let latestSearch = 0;
search.addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(async () => {
    const ticket = ++latestSearch;
    const page = await getJSON(`/adapters?name=${encodeURIComponent(search.value.trim())}&limit=${SEARCH_LIMIT}`);
    if (ticket !== latestSearch) return;  // a later search has already answered
    const current = select.value;
    select.replaceChildren(...page.items.map(option));
    if (page.items.some((a) => a.id === current)) select.value = current;
    pickerNote.textContent = !page.total ? "No adapter matches."
      : page.total > page.items.length ? `Showing ${page.items.length} of ${number(page.total)} matches.`
      : `${page.total} match${page.total === 1 ? "" : "es"}.`;
    showTemplate();
  }, 250);
});
select.addEventListener("change", showTemplate);
showTemplate();

/** Read a /generate event stream: call onText with each piece; return the final event. */
async function readEvents(response, onText) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let final = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5)).join("\n");
      buffer = buffer.slice(end + 2);
      if (!data || data === "[DONE]") continue;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      if (event.text) onText(event.text);
      if (event.finish_reason) final = event;
    }
  }
  if (!final) throw new Error("the stream ended before the answer was complete");
  return final;
}

async function run(panel, body) {
  const text = panel.querySelector('[data-role="text"]');
  const meta = panel.querySelector('[data-role="meta"]');
  text.textContent = "";
  meta.textContent = "Generating…";
  panel.classList.remove("output-error");
  panel.classList.add("busy");
  const started = performance.now();
  try {
    const response = await api("/generate", { method: "POST", json: body });
    if (!response.ok) throw new Error(await errorText(response));
    const result = body.stream ? await readEvents(response, (piece) => text.append(piece)) : await response.json();
    if (!body.stream) text.textContent = result.text;
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    meta.textContent = `${result.usage.completion_tokens} tokens · finished: ${result.finish_reason} · ${seconds} s`;
  } catch (error) {
    panel.classList.add("output-error");
    meta.textContent = error.message;
  } finally {
    panel.classList.remove("busy");
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const prompt = document.getElementById("prompt").value;
  runError.hidden = Boolean(prompt && select.value);
  if (!runError.hidden) {
    runError.textContent = select.value ? "Type a prompt first." : "Choose an adapter first.";
    return;
  }
  const template = chosenTemplate();
  const useTemplate = applyTemplate.checked && Boolean(template);
  const options = {
    max_new_tokens: Number(document.getElementById("max_new_tokens").value),
    temperature: Number(document.getElementById("temperature").value),
    stream: document.getElementById("stream").checked,
  };
  panels.adapter.querySelector('[data-role="label"]').textContent = select.selectedOptions[0].textContent;
  runButton.disabled = true;
  await Promise.all([
    run(panels.adapter, { ...options, adapter_id: select.value, prompt, apply_template: useTemplate }),
    // The base model reads the very text the adapter's row reads: the template laid out here the
    // way the server does it (every "{input}" replaced).
    run(panels.base, { ...options, adapter_id: null, prompt: useTemplate ? template.split("{input}").join(prompt) : prompt }),
  ]);
  runButton.disabled = false;
});
