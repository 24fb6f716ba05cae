// Entry point: reads the page's config (rendered by Django), draws the frame, and loads the
// page's module on demand.

import { errorBox, frame, setLiveStatus } from "./lib/layout.js";
import { ProjectSocket } from "./lib/socket.js";

const PAGES = {
  projects: () => import("./pages/projects.js"),
  dashboard: () => import("./pages/dashboard.js"),
  queue: () => import("./pages/queue.js"),
  workspace: () => import("./pages/workspace.js"),
  review: () => import("./pages/review.js"),
  training: () => import("./pages/training.js"),
  models: () => import("./pages/models.js"),
  exports: () => import("./pages/exports.js"),
  new_project: () => import("./pages/new_project.js"),
  settings: () => import("./pages/settings.js"),
  images: () => import("./pages/images.js"),
  upload: () => import("./pages/images.js"),
  slide: () => import("./pages/slide.js"),
};

async function boot() {
  const config = JSON.parse(document.getElementById("karyo-config").textContent);
  const main = frame(config);
  let socket = null;
  if (config.project) {
    socket = new ProjectSocket(config.project.id, { onStatus: setLiveStatus });
    window.addEventListener("beforeunload", () => socket.close());
  }
  window.karyo = { config, socket };
  try {
    const module = await PAGES[config.page]();
    await module.render(main, { config, socket });
  } catch (error) {
    console.error(error);
    main.append(errorBox(error, () => location.reload()));
  }
}

boot();
