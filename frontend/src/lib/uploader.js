// Chunked, resumable uploads against Karyo's upload API (docs/frontend.md, "Uploads").
//
// Hand-written because the maintained libraries do not fit: Uppy and Resumable.js need a bundler
// or speak their own server protocol (tus), and Karyo's API is a plain one — create an upload,
// PUT numbered chunks (to Karyo in local mode, to presigned S3 URLs in s3 mode), ask which chunks
// arrived, complete. The logic is pure and the network is injected (`transport`), so
// test/uploader.test.js runs it under node with a fake server that drops connections.

import { api, cookie, errorFrom, ApiError } from "./api.js";

export const SLIDE_EXTENSIONS = [".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".tif", ".tiff",
  ".png", ".jpg", ".jpeg"];

// Which dropped files to upload: slide and image formats Karyo reads; hidden files and anything
// else are skipped with a reason the page shows.
export function classifyFiles(files) {
  const accepted = [];
  const skipped = [];
  for (const file of files) {
    const name = (file.relativePath || file.name || "").split("/").pop();
    const lower = name.toLowerCase();
    if (!name || name.startsWith(".")) skipped.push({ file, reason: "hidden file" });
    else if (lower.endsWith(".zip")) skipped.push({ file, reason: "zip files are not unpacked: drop the slides (or their folder) instead" });
    else if (!SLIDE_EXTENSIONS.some((ext) => lower.endsWith(ext))) skipped.push({ file, reason: "not a slide or image format Karyo reads" });
    else if (!file.size) skipped.push({ file, reason: "empty file" });
    else accepted.push(file);
  }
  return { accepted, skipped };
}

// [{n, start, end}] for a file of `size` bytes cut into `chunkSize` parts (0-based n).
export function chunkPlan(size, chunkSize) {
  if (!(chunkSize > 0)) throw new RangeError("chunk size must be positive");
  const parts = [];
  for (let n = 0, start = 0; start < size; n += 1, start += chunkSize) parts.push({ n, start, end: Math.min(size, start + chunkSize) });
  return parts;
}

// Parts still to send, given what the server says it has.
export function pendingParts(plan, received) {
  const have = new Set((received || []).map(Number));
  return plan.filter((p) => !have.has(p.n));
}

export function bytesOf(plan, numbers) {
  const want = new Set((numbers || []).map(Number));
  return plan.reduce((sum, p) => sum + (want.has(p.n) ? p.end - p.start : 0), 0);
}

// Upload speed over a sliding window (bytes/s) and the time left at that speed.
export class RateMeter {
  constructor({ windowMs = 8000 } = {}) {
    this.windowMs = windowMs;
    this.samples = [];
  }

  add(loaded, at) {
    this.samples.push([at, loaded]);
    while (this.samples.length > 2 && at - this.samples[0][0] > this.windowMs) this.samples.shift();
  }

  speed() {
    if (this.samples.length < 2) return null;
    const [t0, b0] = this.samples[0];
    const [t1, b1] = this.samples[this.samples.length - 1];
    if (t1 - t0 < 250) return null;
    return Math.max(0, ((b1 - b0) * 1000) / (t1 - t0));
  }

  etaMs(remaining) {
    const speed = this.speed();
    if (!speed) return null;
    return (remaining / speed) * 1000;
  }
}

export function retryDelay(attempt, { base = 500, max = 15000 } = {}) {
  return Math.min(max, base * 2 ** Math.max(0, attempt));
}

// The key an unfinished upload is remembered under, so dropping the same file after a reload
// resumes it (browsers cannot reopen a file by themselves after a reload).
export function resumeKey(projectId, file) {
  return `karyo.upload.${projectId}.${file.size}.${file.lastModified || 0}.${file.name}`;
}

export function storedUploads(projectId, store) {
  const prefix = `karyo.upload.${projectId}.`;
  const found = [];
  for (let i = 0; i < store.length; i += 1) {
    const key = store.key(i);
    if (!key || !key.startsWith(prefix)) continue;
    try {
      found.push({ key, ...JSON.parse(store.getItem(key)) });
    } catch {
      store.removeItem(key);
    }
  }
  return found;
}

// An error that retrying does not fix (the server refused: 4xx other than 408/429).
function fatal(status) {
  return status >= 400 && status < 500 && status !== 408 && status !== 429;
}

const aborted = () => new DOMException("upload cancelled", "AbortError");

export class ChunkedUpload {
  // transport: {json(method, path, body) -> data (throws ApiError), put(url, blob, {headers, onProgress, signal})
  //             -> {status, etag, body}}; store: a Storage (localStorage) or null.
  constructor({ projectId, file, transport = browserTransport(), store = globalThis.localStorage ?? null, concurrency = 3,
    maxServerRetries = 8, sleep = (ms) => new Promise((r) => setTimeout(r, ms)), now = () => Date.now(),
    onProgress = () => {}, onState = () => {} }) {
    Object.assign(this, { projectId, file, transport, store, concurrency, maxServerRetries, sleep, now, onProgress, onState });
    this.key = resumeKey(projectId, file);
    this.controller = new AbortController();
    this.meter = new RateMeter();
    this.inflight = new Map();
    this.done = new Set();
    this.etags = {};
    this.state = "idle";
  }

  setState(state, message = "") {
    this.state = state;
    this.message = message;
    this.onState(state, message);
  }

  abort() {
    this.controller.abort();
  }

  remember() {
    if (!this.store) return;
    try {
      this.store.setItem(this.key, JSON.stringify({ id: this.id, name: this.file.name, size: this.file.size, chunk_size: this.chunkSize,
        mode: this.mode, etags: this.etags, at: this.now() }));
    } catch { /* storage full or disabled: the upload still works, it just cannot resume after a reload */ }
  }

  forget() {
    this.store?.removeItem(this.key);
  }

  // The server's view of an upload remembered from before, or null when it is gone or finished.
  async previous() {
    const saved = this.store?.getItem(this.key);
    if (!saved) return null;
    let info;
    try {
      info = JSON.parse(saved);
      const status = await this.transport.json("GET", `/api/uploads/${info.id}/`);
      if (status.state === "complete") throw new Error("already complete"); // a new upload; `complete` answers 409 if it is a duplicate
      return { ...status, mode: status.mode || info.mode, etags: { ...(info.etags || {}), ...etagsOf(status) } };
    } catch (error) {
      if (error instanceof ApiError && error.status === 0) throw error;
      this.forget();
      return null;
    }
  }

  report() {
    const inflight = [...this.inflight.values()].reduce((a, b) => a + b, 0);
    const loaded = Math.min(this.file.size, this.confirmed + inflight);
    const at = this.now();
    this.meter.add(loaded, at);
    this.onProgress({ loaded, total: this.file.size, fraction: this.file.size ? loaded / this.file.size : 1,
      speed: this.meter.speed(), etaMs: this.meter.etaMs(this.file.size - loaded), resumedFrom: this.resumedFrom });
  }

  async start() {
    const signal = this.controller.signal;
    this.setState("starting");
    const before = await this.withNetworkRetry(() => this.previous());
    let created;
    if (before) {
      created = before;
      this.setState("resuming", `resuming: the server has ${before.received.length} of the parts`);
    } else {
      created = await this.withNetworkRetry(() => this.transport.json("POST", `/api/projects/${this.projectId}/uploads/`,
        { filename: this.file.name, size: this.file.size }));
    }
    this.id = created.id;
    this.chunkSize = created.chunk_size;
    this.mode = created.mode || "local";
    Object.assign(this.etags, created.etags || {});
    this.plan = chunkPlan(this.file.size, this.chunkSize);
    const received = (created.received || []).filter((n) => this.mode !== "s3" || this.etags[n]);
    for (const n of received) this.done.add(Number(n));
    this.confirmed = bytesOf(this.plan, [...this.done]);
    this.resumedFrom = this.confirmed;
    this.remember();
    this.setState("uploading");
    this.report();

    const queue = pendingParts(this.plan, [...this.done]);
    const workers = Array.from({ length: Math.min(this.concurrency, queue.length) }, async () => {
      while (queue.length) {
        if (signal.aborted) throw aborted();
        await this.sendPart(queue.shift());
      }
    });
    await Promise.all(workers);
    if (signal.aborted) throw aborted();

    this.setState("completing");
    const body = this.mode === "s3"
      ? { parts: this.plan.map((p) => ({ n: p.n, etag: this.etags[p.n] })) }
      : {};
    let result;
    try {
      result = await this.withNetworkRetry(() => this.transport.json("POST", `/api/uploads/${this.id}/complete/`, body));
    } catch (error) {
      if (error instanceof ApiError && fatal(error.status)) this.forget();
      throw error;
    }
    this.forget();
    this.setState("done");
    return result.image;
  }

  // Retries while the network is down (status 0) — a dropped connection must not lose a
  // multi-GB upload — and a few times on server errors; fails at once on a refusal.
  async withNetworkRetry(call) {
    let serverErrors = 0;
    for (let attempt = 0; ; attempt += 1) {
      if (this.controller.signal.aborted) throw aborted();
      try {
        const value = await call();
        if (this.state === "offline") this.setState("uploading");
        return value;
      } catch (error) {
        if (error?.name === "AbortError") throw error;
        const status = error instanceof ApiError ? error.status : 0;
        if (fatal(status)) throw error;
        if (status >= 500 && ++serverErrors > this.maxServerRetries) throw error;
        this.setState("offline", status ? `the server answered ${status}; retrying` : "connection lost; retrying");
        await this.sleep(retryDelay(Math.min(attempt, 6)));
      }
    }
  }

  async partUrl(part) {
    if (this.mode !== "s3") {
      return { url: `/api/uploads/${this.id}/chunks/${part.n}/`, headers: { "X-CSRFToken": cookie("csrftoken") || "", "Content-Type": "application/octet-stream" } };
    }
    // Presigned URLs expire: ask for a small batch ahead and ask again when one is refused.
    if (!this.urls?.[part.n]) {
      const next = pendingParts(this.plan, [...this.done]).map((p) => p.n).filter((n) => n >= part.n).slice(0, 16);
      const { urls } = await this.transport.json("POST", `/api/uploads/${this.id}/parts/`, { parts: next.length ? next : [part.n] });
      this.urls = { ...(this.urls || {}), ...urls };
    }
    return { url: this.urls[part.n], headers: {}, external: true };
  }

  async sendPart(part) {
    const blob = this.file.slice(part.start, part.end);
    await this.withNetworkRetry(async () => {
      const { url, headers, external } = await this.partUrl(part);
      this.inflight.set(part.n, 0);
      let response;
      try {
        response = await this.transport.put(url, blob, { headers, external, signal: this.controller.signal,
          onProgress: (loaded) => {
            this.inflight.set(part.n, loaded);
            this.report();
          } });
      } finally {
        this.inflight.delete(part.n);
      }
      if (response.status >= 200 && response.status < 300) {
        if (!external) return;
        if (!response.etag) {
          throw new ApiError(400, "no_etag", "S3 accepted the part but did not expose its ETag: the bucket's CORS rules must list ETag under ExposeHeaders.");
        }
        this.etags[part.n] = response.etag;
        return;
      }
      if (external && response.status === 403) delete this.urls[part.n]; // expired presigned URL: a new one next try
      throw errorFrom(response.status, parseBody(response.body));
    });
    this.done.add(part.n);
    this.confirmed += part.end - part.start;
    this.remember();
    this.report();
  }
}

// S3 mode: S3 answers each part's PUT with an ETag that `complete` needs; they are remembered
// with the upload (and taken from the server's status when it lists them).
function etagsOf(status) {
  const out = {};
  for (const part of status.parts || []) if (part && part.etag) out[part.n] = part.etag;
  return out;
}

function parseBody(body) {
  if (typeof body !== "string") return body;
  try {
    return JSON.parse(body);
  } catch {
    return body;
  }
}

// The browser's transport: JSON calls through api() (session cookie + CSRF), chunk PUTs through
// XMLHttpRequest because fetch() reports no upload progress.
export function browserTransport() {
  return {
    json: (method, path, body) => api(path, { method, body }),
    put: (url, blob, { headers = {}, onProgress, signal, external = false } = {}) => new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("PUT", url);
      xhr.withCredentials = !external;
      for (const [key, value] of Object.entries(headers)) xhr.setRequestHeader(key, value);
      xhr.upload.onprogress = (event) => onProgress?.(event.loaded);
      xhr.onload = () => resolve({ status: xhr.status, etag: xhr.getResponseHeader("ETag"), body: xhr.responseText });
      xhr.onerror = () => resolve({ status: 0, body: null });
      xhr.ontimeout = () => resolve({ status: 0, body: null });
      xhr.onabort = () => reject(new DOMException("upload cancelled", "AbortError"));
      if (signal) {
        if (signal.aborted) return xhr.abort();
        signal.addEventListener("abort", () => xhr.abort(), { once: true });
      }
      xhr.send(blob);
    }),
  };
}

// Every file under dropped folders (DataTransferItem entries), with its path inside the folder.
export async function filesFromDrop(dataTransfer) {
  const items = [...(dataTransfer.items || [])];
  const entries = items.map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return [...(dataTransfer.files || [])];
  const files = [];
  async function walk(entry, prefix) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      file.relativePath = prefix + file.name;
      files.push(file);
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      // readEntries answers in batches (100 in Chromium) until an empty one.
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      }
    }
  }
  for (const entry of entries) await walk(entry, "");
  return files;
}
