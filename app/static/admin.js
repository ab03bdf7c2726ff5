// Shared by the admin pages: API calls carrying the session's CSRF token, error text, number
// formats that match the server's, polling, and a message that survives one navigation.

const csrfToken = document.querySelector('meta[name="csrf-token"]').content;
const SAFE = new Set(["GET", "HEAD", "OPTIONS"]);

/** fetch() for the JSON API: unsafe methods send the CSRF header the admin session requires. */
export async function api(path, { method = "GET", json, body, signal } = {}) {
  const headers = SAFE.has(method) ? {} : { "X-CSRF-Token": csrfToken };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers, body, signal, credentials: "same-origin" });
  if (response.status === 401) {  // the session ended: log in again, then come back here
    location.assign(`/admin/login?next=${encodeURIComponent(location.pathname + location.search)}`);
  }
  return response;
}

export async function getJSON(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

/** The API's error as one readable line, whatever shape its `detail` has. */
export async function errorText(response) {
  let detail;
  try {
    detail = (await response.json()).detail;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((e) => `${e.loc.slice(1).join(".")}: ${e.msg}`).join("; ");
  return detail?.message ?? `${response.status} ${response.statusText}`;
}

const MISSING = "—";
export const decimal = (x) => (x == null ? MISSING : String(Number(x.toPrecision(4))));
export const percent = (x) => (x == null ? MISSING : `${(x * 100).toFixed(1)}%`);
export const number = (n) => (n == null ? MISSING : n.toLocaleString("en-US"));
export const timestamp = (iso) => (iso ? `${new Date(iso).toISOString().slice(0, 19).replace("T", " ")} UTC` : MISSING);

/** How long until `iso`, worded as the server's `until` filter words it. */
export function until(iso) {
  if (!iso) return MISSING;
  const seconds = Math.floor((new Date(iso) - Date.now()) / 1000);
  if (seconds <= 0) return "any moment";
  if (seconds < 60) return `in ${seconds} s`;
  const minutes = Math.floor(seconds / 60);
  return minutes < 60 ? `in ${minutes} min` : `in ${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

/** Run `task` now and every `ms` while the tab is visible, until `task` returns false. */
export function poll(task, ms) {
  let timer;
  const tick = async () => {
    let again = true;
    if (!document.hidden) {
      try {
        again = (await task()) !== false;
      } catch (error) {
        console.warn("poll failed; retrying", error);
      }
    }
    if (again) timer = setTimeout(tick, ms);
  };
  tick();
  return () => clearTimeout(timer);
}

/** Show a message now, or (`afterNavigation`) on the next page this tab opens. */
export function flash(message, { kind = "ok", afterNavigation = false } = {}) {
  if (afterNavigation) {
    sessionStorage.setItem("flash", JSON.stringify({ message, kind }));
    return;
  }
  const box = document.getElementById("flash");
  box.textContent = message;
  box.className = `flash flash-${kind}`;
  box.hidden = false;
}

const pending = sessionStorage.getItem("flash");
if (pending) {
  sessionStorage.removeItem("flash");
  const { message, kind } = JSON.parse(pending);
  flash(message, { kind });
}
