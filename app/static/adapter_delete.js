// Delete buttons (adapter list and detail page): confirm, DELETE /adapters/{id}, then show the list.
import { api, errorText, flash } from "./admin.js";

for (const button of document.querySelectorAll("[data-delete-adapter]")) {
  button.addEventListener("click", async () => {
    const { deleteAdapter: id, name } = button.dataset;
    if (!confirm(`Delete adapter “${name}” (${id})?\n\nIts files are removed and it stops being served at once.`)) return;
    button.disabled = true;
    const response = await api(`/adapters/${encodeURIComponent(id)}`, { method: "DELETE" });
    if (response.status === 204) {
      flash(`Deleted adapter “${name}”.`, { afterNavigation: true });
      // On the list, reload the same page (the next row moves up); from the detail page, go to the list.
      if (document.getElementById("adapters")) location.reload();
      else location.assign("/admin/adapters");
    } else {
      button.disabled = false;
      flash(`Could not delete “${name}”: ${await errorText(response)}`, { kind: "error" });
    }
  });
}
