import { describe, it } from "node:test";
import { expect } from "./expect.js";
import { ApiError } from "../src/lib/api.js";
import { ChunkedUpload, RateMeter, bytesOf, chunkPlan, classifyFiles, filesFromDrop, pendingParts, resumeKey, storedUploads } from "../src/lib/uploader.js";

// localStorage's interface over a Map.
class MemoryStorage {
  constructor() { this.map = new Map(); }
  get length() { return this.map.size; }
  key(i) { return [...this.map.keys()][i] ?? null; }
  getItem(k) { return this.map.has(k) ? this.map.get(k) : null; }
  setItem(k, v) { this.map.set(k, String(v)); }
  removeItem(k) { this.map.delete(k); }
}

// Karyo's upload API in memory: chunks are kept per upload and joined on complete. `dropPut`
// decides, per chunk PUT, whether the connection drops (status 0) before the server sees it.
function fakeServer({ chunkSize = 10, mode = "local", dropPut = () => false, refuseComplete = null, refusePut = null } = {}) {
  const uploads = new Map();
  const log = { puts: [], json: [] };
  let nextId = 1;
  const server = {
    uploads, log,
    transport: {
      async json(method, path, body) {
        log.json.push(`${method} ${path}`);
        let m;
        if (method === "POST" && (m = path.match(/^\/api\/projects\/(\d+)\/uploads\/$/))) {
          const id = `u${nextId++}`;
          uploads.set(id, { id, filename: body.filename, size: body.size, chunks: new Map(), state: "receiving" });
          return { id, chunk_size: chunkSize, mode, received: [] };
        }
        if (method === "GET" && (m = path.match(/^\/api\/uploads\/(\w+)\/$/))) {
          const u = uploads.get(m[1]);
          if (!u) throw new ApiError(404, "not_found", "no such upload");
          const received = [...u.chunks.keys()].sort((a, b) => a - b);
          return { id: u.id, filename: u.filename, size: u.size, chunk_size: chunkSize, received,
            bytes_received: received.reduce((s, n) => s + u.chunks.get(n).length, 0), state: u.state };
        }
        if (method === "POST" && (m = path.match(/^\/api\/uploads\/(\w+)\/parts\/$/))) {
          return { urls: Object.fromEntries(body.parts.map((n) => [n, `https://s3.example/${m[1]}/${n}?sig=x`])) };
        }
        if (method === "POST" && (m = path.match(/^\/api\/uploads\/(\w+)\/complete\/$/))) {
          if (refuseComplete) throw refuseComplete;
          const u = uploads.get(m[1]);
          const count = Math.ceil(u.size / chunkSize);
          for (let n = 0; n < count; n += 1) if (!u.chunks.has(n)) throw new ApiError(400, "incomplete", `part ${n} is missing`);
          if (mode === "s3") {
            for (const part of body.parts) if (part.etag !== `"etag-${part.n}"`) throw new ApiError(400, "bad_etag", `part ${part.n}`);
          }
          u.state = "complete";
          u.bytes = Buffer.concat([...Array(count).keys()].map((n) => u.chunks.get(n)));
          return { image: { id: 7, state: "ingesting", name: u.filename } };
        }
        throw new Error(`unexpected ${method} ${path}`);
      },
      async put(url, blob, { onProgress } = {}) {
        log.puts.push(url);
        const m = url.match(/uploads\/(\w+)\/chunks\/(\d+)\/$/) || url.match(/s3\.example\/(\w+)\/(\d+)\?/);
        const [id, n] = [m[1], Number(m[2])];
        if (refusePut) return { status: refusePut, body: JSON.stringify({ error: { code: "too_large", message: "chunk too large" } }) };
        if (dropPut(n, log.puts.length)) return { status: 0, body: null };
        const bytes = Buffer.from(await blob.arrayBuffer());
        onProgress?.(bytes.length / 2);
        onProgress?.(bytes.length);
        uploads.get(id).chunks.set(n, bytes);
        return { status: 200, etag: mode === "s3" ? `"etag-${n}"` : null, body: "{}" };
      },
    },
  };
  return server;
}

function fileOf(size, name = "slide.svs") {
  const bytes = new Uint8Array(size).map((_, i) => (i * 31 + 7) % 251);
  return { file: new File([bytes], name, { lastModified: 1700000000000 }), bytes: Buffer.from(bytes) };
}

const noSleep = async () => {};

describe("chunk plans", () => {
  it("cuts a file into 0-based parts with a short last part", () => {
    expect(chunkPlan(25, 10)).toEqual([{ n: 0, start: 0, end: 10 }, { n: 1, start: 10, end: 20 }, { n: 2, start: 20, end: 25 }]);
    expect(chunkPlan(20, 10)).toHaveLength(2);
    expect(chunkPlan(0, 10)).toEqual([]);
  });
  it("sends only the parts the server does not have", () => {
    const plan = chunkPlan(45, 10);
    expect(pendingParts(plan, [0, "2", 4]).map((p) => p.n)).toEqual([1, 3]);
    expect(bytesOf(plan, [0, 4])).toBe(15);
  });
});

describe("choosing files", () => {
  it("keeps slide and image formats and says why the others are skipped", () => {
    const f = (name, size = 5) => ({ name, size });
    const { accepted, skipped } = classifyFiles([f("a.svs"), f("b.NDPI"), f("c.ome.tiff"), f(".DS_Store"), f("notes.txt"), f("s.zip"), f("e.png", 0)]);
    expect(accepted.map((x) => x.name)).toEqual(["a.svs", "b.NDPI", "c.ome.tiff"]);
    expect(skipped.map((x) => x.reason)).toEqual(["hidden file", "not a slide or image format Karyo reads",
      "zip files are not unpacked: drop the slides (or their folder) instead", "empty file"]);
  });
});

describe("dropped folders", () => {
  // The FileSystemEntry API of a drop: directories answer readEntries in batches, then [].
  const file = (name) => ({ isFile: true, isDirectory: false, name, file: (ok) => ok(new File(["x"], name)) });
  const dir = (name, children, batch = 2) => ({
    isFile: false, isDirectory: true, name,
    createReader() {
      let at = 0;
      return { readEntries: (ok) => { ok(children.slice(at, at + batch)); at += batch; } };
    },
  });
  it("walks every folder level and every batch, keeping the paths", async () => {
    const tree = dir("case-12", [file("a.svs"), dir("extra", [file("b.ndpi")]), file("c.svs"), file("notes.txt"), file("d.tiff")]);
    const files = await filesFromDrop({ items: [{ webkitGetAsEntry: () => tree }, { webkitGetAsEntry: () => file("e.png") }] });
    expect(files.map((f) => f.relativePath)).toEqual(["case-12/a.svs", "case-12/extra/b.ndpi", "case-12/c.svs", "case-12/notes.txt",
      "case-12/d.tiff", "e.png"]);
  });
  it("falls back to the plain file list", async () => {
    const plain = [new File(["x"], "a.svs")];
    expect(await filesFromDrop({ items: [], files: plain })).toEqual(plain);
  });
});

describe("upload speed", () => {
  it("measures bytes per second over a window and the time left", () => {
    const meter = new RateMeter({ windowMs: 4000 });
    expect(meter.speed()).toBeNull();
    meter.add(0, 0);
    meter.add(1000, 1000);
    meter.add(2000, 2000);
    expect(meter.speed()).toBe(1000);
    expect(meter.etaMs(5000)).toBe(5000);
    meter.add(12000, 7000); // the window forgets the slow start
    expect(meter.speed()).toBeGreaterThan(1900);
  });
});

describe("chunked uploads", () => {
  it("uploads every part and the server gets the exact bytes", async () => {
    const server = fakeServer({ chunkSize: 10 });
    const { file, bytes } = fileOf(95);
    const progress = [];
    const upload = new ChunkedUpload({ projectId: 3, file, transport: server.transport, store: new MemoryStorage(), sleep: noSleep,
      onProgress: (p) => progress.push(p.fraction) });
    const image = await upload.start();
    expect(image).toEqual({ id: 7, state: "ingesting", name: "slide.svs" });
    expect(server.uploads.get("u1").bytes.equals(bytes)).toBe(true);
    expect(server.log.puts).toHaveLength(10);
    expect(progress[progress.length - 1]).toBe(1);
    expect(Math.max(...progress)).toBe(1);
    expect(upload.state).toBe("done");
  });

  it("survives a dropped connection: retries the part until the network is back", async () => {
    let drops = 0;
    const server = fakeServer({ chunkSize: 10, dropPut: (n) => n === 3 && drops++ < 4 });
    const { file, bytes } = fileOf(60);
    const states = [];
    const sleeps = [];
    const upload = new ChunkedUpload({ projectId: 3, file, transport: server.transport, store: new MemoryStorage(),
      sleep: async (ms) => sleeps.push(ms), onState: (s) => states.push(s) });
    await upload.start();
    expect(server.uploads.get("u1").bytes.equals(bytes)).toBe(true);
    expect(states).toContain("offline");
    expect(sleeps).toEqual([500, 1000, 2000, 4000]);
    expect(server.log.puts.filter((u) => u.endsWith("/chunks/3/"))).toHaveLength(5);
  });

  it("resumes after a reload: asks the server which parts it has and sends only the rest", async () => {
    const server = fakeServer({ chunkSize: 10 });
    const store = new MemoryStorage();
    const { file, bytes } = fileOf(100);
    const first = new ChunkedUpload({ projectId: 3, file, transport: server.transport, store, concurrency: 1, sleep: noSleep,
      onProgress: (p) => { if (p.loaded >= 40) first.abort(); } });
    let error = null;
    await first.start().catch((e) => { error = e; });
    expect(error.name).toBe("AbortError");
    const have = server.uploads.get("u1").chunks.size;
    expect(have).toBeGreaterThanOrEqual(4);
    expect(storedUploads(3, store).map((u) => u.id)).toEqual(["u1"]);

    server.log.puts.length = 0;
    const again = new ChunkedUpload({ projectId: 3, file, transport: server.transport, store, sleep: noSleep });
    await again.start();
    expect(server.log.json).toContain("GET /api/uploads/u1/");
    expect(server.log.puts).toHaveLength(10 - have);
    expect(again.resumedFrom).toBe(have * 10);
    expect(server.uploads.size).toBe(1);
    expect(server.uploads.get("u1").bytes.equals(bytes)).toBe(true);
    expect(storedUploads(3, store)).toEqual([]);
  });

  it("starts afresh when the remembered upload is gone on the server", async () => {
    const server = fakeServer({ chunkSize: 10 });
    const store = new MemoryStorage();
    const { file } = fileOf(30);
    store.setItem(resumeKey(3, file), JSON.stringify({ id: "gone", chunk_size: 10, mode: "local" }));
    await new ChunkedUpload({ projectId: 3, file, transport: server.transport, store, sleep: noSleep }).start();
    expect(server.log.json.slice(0, 2)).toEqual(["GET /api/uploads/gone/", "POST /api/projects/3/uploads/"]);
  });

  it("reports a refusal at once (the same slide twice) and forgets the upload", async () => {
    const server = fakeServer({ refuseComplete: new ApiError(409, "duplicate", "this slide is already in the project as image 4") });
    const store = new MemoryStorage();
    const { file } = fileOf(25);
    const upload = new ChunkedUpload({ projectId: 3, file, transport: server.transport, store, sleep: noSleep });
    let error = null;
    await upload.start().catch((e) => { error = e; });
    expect([error.status, error.message]).toEqual([409, "this slide is already in the project as image 4"]);
    expect(storedUploads(3, store)).toEqual([]);
  });

  it("does not retry a chunk the server refuses", async () => {
    const server = fakeServer({ refusePut: 413 });
    const { file } = fileOf(25);
    let error = null;
    await new ChunkedUpload({ projectId: 3, file, transport: server.transport, store: null, concurrency: 1, sleep: noSleep })
      .start().catch((e) => { error = e; });
    expect([error.status, error.message]).toEqual([413, "chunk too large"]);
    expect(server.log.puts).toHaveLength(1);
  });

  it("in s3 mode PUTs to presigned URLs and completes with the parts' ETags", async () => {
    const server = fakeServer({ chunkSize: 10, mode: "s3" });
    const { file, bytes } = fileOf(35);
    await new ChunkedUpload({ projectId: 3, file, transport: server.transport, store: new MemoryStorage(), sleep: noSleep }).start();
    expect(server.log.puts.every((u) => u.startsWith("https://s3.example/"))).toBe(true);
    expect(server.log.json.filter((c) => c.endsWith("/parts/")).length).toBeGreaterThanOrEqual(1);
    expect(server.uploads.get("u1").bytes.equals(bytes)).toBe(true);
  });
});
