// The page frame: top bar with the project's sections, the user's role, sign-out; toasts;
// the worker/live-updates indicators.

import { api, cookie } from "./api.js";
import { h, replace } from "./dom.js";
import { roleAtLeast } from "./format.js";

const SECTIONS = [
  { page: "dashboard", label: "Dashboard", path: "" },
  { page: "images", label: "Images", path: "images/", also: ["slide", "upload"] },
  { page: "queue", label: "Queue", path: "queue/" },
  { page: "review", label: "Review", path: "review/" },
  { page: "training", label: "Training", path: "training/" },
  { page: "models", label: "Models", path: "models/" },
  { page: "exports", label: "Exports", path: "exports/", minimum: "reviewer" },
  { page: "settings", label: "Settings", path: "settings/", minimum: "admin" },
];

export function projectUrl(project, path = "") {
  return `/projects/${project.id}/${path}`;
}

export function frame(config) {
  const { project, user, page } = config;
  const nav = project
    ? h("nav", { class: "sections", "aria-label": "Project sections" },
      SECTIONS.filter((s) => !s.minimum || roleAtLeast(project.my_role, s.minimum)).map((s) =>
        h("a", { href: projectUrl(project, s.path), class: ["section", (page === s.page || s.also?.includes(page) || (page === "workspace" && s.page === "queue")) && "active"] }, s.label)))
    : null;
  const status = h("div", { class: "status-pills" },
    h("span", { class: "pill pill-muted", id: "live-pill", title: "Live updates from the server", hidden: true }, "live"),
    h("span", { class: "pill pill-muted", id: "worker-pill", title: "Background worker (training, predictions, exports)" }, "worker …"));
  const logout = h("form", { method: "post", action: "/logout/", class: "logout" },
    h("input", { type: "hidden", name: "csrfmiddlewaretoken", value: cookie("csrftoken") || "" }),
    h("button", { type: "submit", class: "btn btn-ghost btn-small" }, "Sign out"));
  const header = h("header", { class: "topbar" },
    h("div", { class: "brand-row" },
      h("a", { href: "/", class: "brand" }, h("span", { class: "brand-mark" }, "K"), "Karyo"),
      project ? h("span", { class: "crumb-sep" }, "/") : null,
      project ? h("a", { href: projectUrl(project), class: "crumb", "data-testid": "project-name" }, project.name) : null,
      h("div", { class: "spacer" }),
      status,
      h("span", { class: "user", "data-testid": "user" }, user.username,
        project?.my_role ? h("span", { class: `role role-${project.my_role}`, "data-testid": "role" }, project.my_role) : null),
      logout),
    nav);
  const main = h("main", { class: ["content", `page-${page}`] });
  const toasts = h("div", { class: "toasts", "aria-live": "polite" });
  replace(document.getElementById("app"), header, main, toasts);
  watchWorker();
  return main;
}

export function toast(message, kind = "info", ms = 4500) {
  const area = document.querySelector(".toasts");
  if (!area) return;
  const el = h("div", { class: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  area.append(el);
  setTimeout(() => el.classList.add("leaving"), ms);
  setTimeout(() => el.remove(), ms + 400);
}

let workerState = null;
const workerListeners = new Set();

export function onWorkerStatus(listener) {
  workerListeners.add(listener);
  if (workerState) listener(workerState);
  return () => workerListeners.delete(listener);
}

async function checkWorker(refresh = false) {
  const pill = document.getElementById("worker-pill");
  try {
    const status = await api(`/api/system/status/${refresh ? "?refresh=1" : ""}`);
    workerState = status.worker;
  } catch {
    workerState = { online: false, workers: [], error: "status unavailable" };
  }
  if (pill) {
    pill.textContent = workerState.online ? "worker online" : "worker offline";
    pill.className = `pill ${workerState.online ? "pill-ok" : "pill-bad"}`;
    pill.title = workerState.online
      ? `Workers: ${workerState.workers.join(", ")}`
      : "No background worker answers: training, predictions, ranking and exports wait until one is started (make run starts one).";
  }
  for (const listener of workerListeners) listener(workerState);
}

let watching = false;
function watchWorker() {
  if (watching) return;
  watching = true;
  checkWorker();
  setInterval(() => checkWorker(), 30000);
}

export function setLiveStatus(status) {
  const pill = document.getElementById("live-pill");
  if (!pill) return;
  pill.hidden = false;
  const labels = { live: "live", connecting: "connecting…", reconnecting: "reconnecting…", offline: "offline – retrying", forbidden: "no live updates" };
  pill.textContent = labels[status] ?? status;
  pill.className = `pill ${status === "live" ? "pill-ok" : status === "connecting" ? "pill-muted" : "pill-warn"}`;
  pill.dataset.status = status;
}

// A titled block; `actions` go to the right of the title.
export function card(title, body, { actions = null, id = null, className = "" } = {}) {
  return h("section", { class: ["card", className], id },
    title || actions ? h("div", { class: "card-head" }, title ? h("h2", {}, title) : null, h("div", { class: "spacer" }), actions) : null,
    body);
}

export function emptyState(title, text, action = null, kind = "") {
  return h("div", { class: ["empty", kind && `empty-${kind}`], "data-testid": "empty-state" },
    h("div", { class: "empty-title" }, title), text ? h("p", {}, text) : null, action);
}

export function errorBox(error, retry = null) {
  return h("div", { class: "error-box", role: "alert" },
    h("strong", {}, "Something went wrong. "), error?.message || String(error),
    retry ? h("button", { class: "btn btn-small", onclick: retry }, "Try again") : null);
}

export function spinner(text = "Loading…") {
  return h("div", { class: "loading" }, h("span", { class: "spin" }), text);
}

export function badge(status, text = null) {
  return h("span", { class: `badge badge-${status ?? "none"}` }, text ?? status ?? "none");
}

export function progressBar(fraction, label = null) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  return h("div", { class: "progress", role: "progressbar", "aria-valuenow": Math.round(pct), "aria-valuemin": 0, "aria-valuemax": 100 },
    h("div", { class: "progress-fill", style: { width: `${pct.toFixed(1)}%` } }),
    label ? h("span", { class: "progress-label" }, label) : null);
}
