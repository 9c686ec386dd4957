// llmpipe review: the only script the UI runs (served from /static, allowed by the CSP).
// Conveniences, never security: the server validates and de-duplicates everything.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // A double click must not send two decisions; the server would refuse the second anyway.
  for (const form of document.querySelectorAll("form[data-once]")) {
    form.addEventListener("submit", (event) => {
      if (form.dataset.sent === "1") {
        event.preventDefault();
        return;
      }
      form.dataset.sent = "1";
      for (const button of form.querySelectorAll("button[type=submit]")) {
        button.disabled = true;
      }
    });
  }

  // Parse the JSON editor as the reviewer types, and offer to pretty-print it.
  const status = document.getElementById("json-status");
  for (const area of document.querySelectorAll("textarea[data-json]")) {
    const check = () => {
      try {
        const value = JSON.parse(area.value);
        const isObject = value !== null && typeof value === "object" && !Array.isArray(value);
        status.textContent = isObject ? "" : "The output must be a JSON object.";
        return isObject ? value : null;
      } catch (error) {
        status.textContent = "Not valid JSON yet: " + error.message;
        return null;
      }
    };
    area.addEventListener("input", check);
    const format = document.querySelector(`button[data-format="${area.id}"]`);
    if (format) {
      format.addEventListener("click", () => {
        const value = check();
        if (value !== null) area.value = JSON.stringify(value, null, 2);
      });
    }
  }

  // Queue rows: click anywhere on a row to open it; j/k move a selection, o/Enter open.
  const rows = Array.from(document.querySelectorAll("table.queue tbody tr[data-href]"));
  let selected = -1;
  const select = (index) => {
    if (!rows.length) return;
    if (selected >= 0) rows[selected].classList.remove("selected");
    selected = Math.max(0, Math.min(rows.length - 1, index));
    rows[selected].classList.add("selected");
    rows[selected].scrollIntoView({ block: "nearest" });
  };
  for (const row of rows) {
    row.addEventListener("click", (event) => {
      if (event.target.closest("a, button, input, select, textarea")) return;
      window.location.assign(row.dataset.href);
    });
  }

  // Keyboard shortcuts; never while typing, never with modifier keys.
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target.closest && target.closest("input, textarea, select, [contenteditable]")) return;
    const key = event.key;
    if (key === "j") return select(selected + 1);
    if (key === "k") return select(selected - 1);
    if ((key === "o" || key === "Enter") && selected >= 0) {
      return window.location.assign(rows[selected].dataset.href);
    }
    const form = document.querySelector(`form[data-key="${key}"]`);
    if (form) {
      const button = form.querySelector("button[type=submit]");
      if (button && !button.disabled) {
        event.preventDefault();
        form.requestSubmit(button);
      }
      return;
    }
    const link = document.querySelector(`a[data-key="${key}"]`);
    if (link) return window.location.assign(link.href);
    const field = document.querySelector(`[data-focus="${key}"]`);
    if (field) {
      event.preventDefault();
      field.focus();
    }
  });
});
