// llmpipe review: the only script the UI runs (served from /static, allowed by the CSP).
// Two conveniences, never security: the server validates and de-duplicates everything.
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
});
