// The project's images (/projects/<id>/images/) and, for project admins, the upload page
// (/projects/<id>/upload/): drop slides or folders, each file goes up in resumable chunks with
// its own progress bar (bytes, speed, time left), then its ingest progress arrives over the
// project WebSocket (`image.ingest`), then the slide appears in the list below.
import { api, listAll } from "../lib/api.js";
import { h, replace } from "../lib/dom.js";
import { duration, plural, roleAtLeast } from "../lib/format.js";
import { badge, card, emptyState, errorBox, onWorkerStatus, progressBar, projectUrl, spinner, toast } from "../lib/layout.js";
import { ChunkedUpload, SLIDE_EXTENSIONS, classifyFiles, filesFromDrop, resumeKey, storedUploads } from "../lib/uploader.js";

export function humanBytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
}

function stateLine(image) {
  if (image.state === "failed") {
    return h("div", { class: "image-state failed", "data-testid": "image-failed" }, badge("failed"), " ", image.state_reason || "ingest failed");
  }
  if (image.state === "ingesting") {
    const p = image.ingest_progress || 0;
    return h("div", { class: "image-state", "data-testid": "image-ingesting" },
      progressBar(p, `ingesting ${Math.round(p * 100)}%`), image.message ? h("div", { class: "muted small" }, image.message) : null);
  }
  return h("div", { class: "image-state small", "data-testid": "image-tiles" },
    image.tiles_grid ? `${image.tiles_kept} of ${plural(image.tiles_grid, "grid tile")} kept (tissue)` : plural(image.tiles_kept || 0, "tile"));
}

function imageCard(project, image) {
  const size = image.width && image.height ? `${image.width.toLocaleString("en")} × ${image.height.toLocaleString("en")} px` : "size not read yet";
  const mpp = image.microns_per_pixel ? ` · ${image.microns_per_pixel.toFixed(3)} µm/px` : "";
  const ready = image.state === "ready" || !image.state;
  const thumb = image.thumbnail_url && ready
    ? h("img", { src: image.thumbnail_url, alt: `thumbnail of ${image.name}`, loading: "lazy" })
    : h("div", { class: "thumb-placeholder" }, image.state === "failed" ? "✕" : ready ? "no thumbnail" : "…");
  const body = [
    h("div", { class: "image-thumb" }, thumb),
    h("div", { class: "image-card-body" },
      h("div", { class: "image-name", title: image.name }, image.name),
      h("div", { class: "muted small" }, size, mpp, image.kind === "slide" ? ` · ${plural(image.levels || 1, "level")}` : ""),
      stateLine(image)),
  ];
  return ready
    ? h("a", { class: "image-card", href: projectUrl(project, `images/${image.id}/`), "data-testid": "image-card", "data-image-id": image.id,
      "data-state": image.state || "ready", title: "Open in the slide viewer" }, body)
    : h("div", { class: "image-card", "data-testid": "image-card", "data-image-id": image.id, "data-state": image.state }, body);
}

export async function render(main, { config, socket }) {
  const { project, page } = config;
  const isAdmin = roleAtLeast(project.my_role, "admin");
  const uploading = page === "upload";
  main.append(h("div", { class: "page-head compact" },
    h("h1", {}, uploading ? "Upload slides" : "Images"),
    h("div", { class: "head-actions" },
      uploading ? h("a", { class: "btn", href: projectUrl(project, "images/") }, "All images")
        : isAdmin ? h("a", { class: "btn btn-primary", href: projectUrl(project, "upload/"), "data-testid": "upload-link" }, "Upload slides") : null)));

  const listBody = h("div", {}, spinner());
  const images = new Map(); // id -> image (with live ingest fields)
  let workerOnline = true;

  function draw() {
    const all = [...images.values()].sort((a, b) => b.id - a.id);
    const waiting = !workerOnline && all.some((img) => img.state === "ingesting");
    replace(listBody, waiting
      ? h("div", { class: "interrupted-box", "data-testid": "ingest-waits", style: { margin: "0 0 12px" } },
        "No background worker is running: ingest waits until one starts (make run starts one).")
      : null, all.length
      ? h("div", { class: "image-cards", "data-testid": "image-list" }, all.map((img) => imageCard(project, img)))
      : emptyState("No images yet", isAdmin
        ? "Upload slides (SVS, NDPI, SCN, BIF, pyramidal TIFF) or PNG/JPEG images; large ones go up in resumable chunks."
        : "A project admin uploads slides here."));
  }

  let poll = null;
  async function load() {
    const list = await listAll(`/api/projects/${project.id}/images/`, { max: 5000 });
    images.clear();
    for (const img of list) images.set(img.id, img);
    draw();
    // Events are best effort (a dropped socket loses some): poll while something ingests.
    clearTimeout(poll);
    if (list.some((img) => img.state === "ingesting")) poll = setTimeout(() => load().catch(() => {}), 5000);
  }

  const uploads = uploading && isAdmin ? uploadPanel(project, socket, () => load().catch(() => {})) : null;
  if (uploads) main.append(uploads);
  main.append(card(uploading ? "Images in this project" : null, listBody));

  try {
    await load();
  } catch (error) {
    replace(listBody, errorBox(error, () => location.reload()));
    return;
  }
  onWorkerStatus((worker) => {
    if (worker.online === workerOnline) return;
    workerOnline = worker.online;
    draw();
  });
  let reload = null;
  socket?.subscribe((event) => {
    if (event.kind !== "image.ingest") return;
    const img = images.get(event.image_id);
    if (!img || event.state !== img.state) {
      clearTimeout(reload);
      reload = setTimeout(() => load().catch(() => {}), 300);
    }
    if (img) {
      Object.assign(img, { state: event.state, ingest_progress: event.progress, message: event.message,
        tiles_kept: event.tiles_kept ?? img.tiles_kept, tiles_grid: event.tiles_grid ?? img.tiles_grid });
      if (event.state === "failed") img.state_reason = event.message || img.state_reason;
      draw();
    }
  });
}

function uploadPanel(project, socket, onIngested) {
  const rows = h("div", { class: "upload-rows", "data-testid": "upload-rows" });
  const notes = h("div", { class: "upload-notes" });
  const interrupted = h("div", { class: "interrupted" });
  const fileInput = h("input", { type: "file", multiple: true, hidden: true, "data-testid": "file-input",
    accept: SLIDE_EXTENSIONS.join(",") });
  const folderInput = h("input", { type: "file", multiple: true, hidden: true, webkitdirectory: true, "data-testid": "folder-input" });
  const zone = h("div", { class: "drop-zone", "data-testid": "drop-zone", tabindex: "0" },
    h("div", { class: "drop-title" }, "Drop slides or folders here"),
    h("div", { class: "muted small" }, `SVS, NDPI, SCN, BIF, pyramidal TIFF / OME-TIFF, PNG, JPEG (MIRAX and other multi-file slides:
      convert them or use manage.py import_images). Uploads resume after a dropped connection; after a reload, drop the same file
      again to continue where it stopped.`),
    h("div", { class: "drop-actions" },
      h("button", { type: "button", class: "btn", onclick: () => fileInput.click() }, "Choose files"),
      h("button", { type: "button", class: "btn", onclick: () => folderInput.click() }, "Choose a folder")),
    fileInput, folderInput);

  const queue = [];
  const active = new Set(); // resume keys queued or uploading: the same file dropped twice goes up once
  let busy = false;
  // Leaving mid-upload loses nothing (it resumes), but the upload stops: ask first.
  window.addEventListener("beforeunload", (event) => {
    if (!busy) return;
    event.preventDefault();
    event.returnValue = "";
  });

  function add(files) {
    const { accepted: all, skipped } = classifyFiles(files);
    const accepted = all.filter((file) => {
      const key = resumeKey(project.id, file);
      if (active.has(key)) skipped.push({ file, reason: "already uploading" });
      return !active.has(key) && active.add(key);
    });
    replace(notes, skipped.length
      ? h("div", { class: "muted small", "data-testid": "skipped" }, `Skipped ${plural(skipped.length, "file")}: `,
        skipped.slice(0, 6).map((s) => `${s.file.relativePath || s.file.name} (${s.reason})`).join("; "), skipped.length > 6 ? " …" : "")
      : null);
    for (const file of accepted) {
      const row = uploadRow(project, file, socket, onIngested);
      rows.prepend(row.el);
      queue.push(row);
    }
    pump();
  }

  async function pump() {
    if (busy) return;
    busy = true;
    // One file at a time (each with a few parallel chunks): the first slide is ready soonest.
    while (queue.length) {
      const row = queue.shift();
      await row.run();
      active.delete(resumeKey(project.id, row.file));
    }
    busy = false;
    showInterrupted();
  }

  function showInterrupted() {
    const stored = globalThis.localStorage ? storedUploads(project.id, localStorage) : [];
    replace(interrupted, stored.length
      ? h("div", { class: "interrupted-box", "data-testid": "interrupted" },
        h("strong", {}, "Unfinished uploads. "), "Drop the same file again to resume:",
        h("ul", {}, stored.map((u) => {
          const sizeText = h("span", {}, `(${humanBytes(u.size)})`);
          // What the server holds of it (the browser's note may be older than the server's state).
          api(`/api/uploads/${u.id}/`).then((status) => {
            sizeText.textContent = `(${humanBytes(status.bytes_received)} of ${humanBytes(u.size)} uploaded)`;
          }).catch((error) => {
            if (error.status === 404) {
              localStorage.removeItem(u.key);
              showInterrupted();
            }
          });
          return h("li", {}, `${u.name} `, sizeText, " ",
            h("button", { class: "btn-link", onclick: () => { localStorage.removeItem(u.key); showInterrupted(); } }, "forget"));
        })))
      : null);
  }

  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    add(await filesFromDrop(e.dataTransfer));
  });
  for (const input of [fileInput, folderInput]) {
    input.addEventListener("change", () => {
      add([...input.files].map((f) => {
        if (f.webkitRelativePath) f.relativePath = f.webkitRelativePath;
        return f;
      }));
      input.value = "";
    });
  }
  showInterrupted();
  return card("Upload", h("div", {}, zone, notes, interrupted, rows), { id: "upload-card" });
}

function uploadRow(project, file, socket, onIngested) {
  const bar = h("div", {}, progressBar(0, "waiting"));
  const detail = h("div", { class: "muted small", "data-testid": "upload-detail" }, humanBytes(file.size));
  const state = h("div", { class: "upload-state", "data-testid": "upload-state" }, "waiting");
  const cancel = h("button", { class: "btn btn-ghost btn-small", type: "button" }, "Cancel");
  const el = h("div", { class: "upload-row", "data-testid": "upload-row", "data-file": file.name },
    h("div", { class: "upload-head" }, h("strong", {}, file.relativePath || file.name), h("div", { class: "spacer" }), cancel),
    bar, detail, state);
  let upload = null;
  let cancelled = false;
  cancel.onclick = () => {
    cancelled = true;
    upload?.abort();
    cancel.disabled = true;
  };

  function setBar(fraction, label) {
    replace(bar, progressBar(fraction, label));
  }

  async function run() {
    if (cancelled) {
      state.textContent = "cancelled";
      return;
    }
    const resumable = globalThis.localStorage?.getItem(resumeKey(project.id, file));
    upload = new ChunkedUpload({
      projectId: project.id, file,
      onState: (s, message) => {
        el.dataset.state = s;
        state.textContent = { starting: "starting…", resuming: message, uploading: "uploading", offline: `${message}…`,
          completing: "finishing the upload…", done: "uploaded" }[s] || s;
      },
      onProgress: (p) => {
        const pct = Math.floor(p.fraction * 1000) / 10;
        setBar(p.fraction, `${pct}%`);
        const parts = [`${humanBytes(p.loaded)} of ${humanBytes(p.total)}`];
        if (p.speed) parts.push(`${humanBytes(p.speed)}/s`);
        if (p.etaMs !== null && p.fraction < 1) parts.push(`${duration(p.etaMs)} left`);
        if (p.resumedFrom) parts.push(`resumed at ${humanBytes(p.resumedFrom)}`);
        detail.textContent = parts.join(" · ");
      },
    });
    if (resumable) state.textContent = "checking what the server already has…";
    let image;
    try {
      image = await upload.start();
    } catch (error) {
      cancel.remove();
      if (error?.name === "AbortError") {
        el.dataset.state = "cancelled";
        state.textContent = "cancelled (the parts sent so far are kept: drop the file again to resume)";
        return;
      }
      el.dataset.state = "failed";
      state.replaceChildren(badge("failed"), " ", error.message || String(error));
      return;
    }
    cancel.remove();
    setBar(1, "100%");
    watchIngest(image);
  }

  function watchIngest(image) {
    el.dataset.state = "ingesting";
    el.dataset.imageId = image.id;
    const ingest = h("div", {}, progressBar(image.ingest_progress || 0, "ingesting"));
    replace(state, h("div", { class: "small" }, "Ingesting: reading the slide, finding tissue, cutting tiles…"), ingest);
    let finished = false;
    const show = (img) => {
      if (finished) return;
      if (img.state === "ingesting") {
        const p = img.progress ?? img.ingest_progress ?? 0;
        replace(ingest, progressBar(p, `ingesting ${Math.round(p * 100)}%`), img.message ? h("div", { class: "muted small" }, img.message) : null);
        return;
      }
      finished = true;
      unsubscribe?.();
      clearInterval(timer);
      el.dataset.state = img.state;
      if (img.state === "failed") {
        replace(state, badge("failed"), " ", img.state_reason || img.message || "ingest failed");
        toast(`${file.name}: ingest failed`, "error");
      } else {
        const kept = img.tiles_kept ?? 0;
        replace(state, badge("reviewed", "ready"), " ",
          img.tiles_grid ? `${kept} of ${plural(img.tiles_grid, "grid tile")} kept. ` : "",
          h("a", { href: projectUrl(project, `images/${image.id}/`), "data-testid": "open-viewer" }, "Open in the slide viewer →"));
      }
      onIngested();
    };
    const unsubscribe = socket?.subscribe((event) => {
      if (event.kind === "image.ingest" && event.image_id === image.id) show(event);
    });
    // The socket is best effort; the image's own state is the truth.
    const timer = setInterval(() => api(`/api/images/${image.id}/`).then(show).catch(() => {}), 3000);
    onIngested();
  }

  return { el, run, file };
}
