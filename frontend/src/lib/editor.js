// The Label Studio editor (@heartexlabs/label-studio 1.4.0, prebuilt UMD bundle) embedded in
// the correction workspace: loaded on demand with a script tag, one instance per tile.
//
// Opening a tile: Label Studio starts with an empty annotation; once the image has its size,
// all polygons are added in one deserializeResults call. Adding them before the image is
// ready makes Label Studio re-scale every point of every region when the image size arrives,
// which costs about a third more on a 300-nucleus tile.

let loading = null;

export function loadLabelStudio(assets) {
  if (globalThis.LabelStudio) return Promise.resolve(globalThis.LabelStudio);
  if (loading) return loading;
  loading = new Promise((resolve, reject) => {
    if (!document.querySelector(`link[data-ls="${assets.version}"]`)) {
      const css = document.createElement("link");
      css.rel = "stylesheet";
      css.href = assets.css;
      css.dataset.ls = assets.version;
      document.head.append(css);
    }
    const script = document.createElement("script");
    script.src = assets.js;
    script.async = true;
    script.onload = () => (globalThis.LabelStudio ? resolve(globalThis.LabelStudio) : reject(new Error("Label Studio did not load")));
    script.onerror = () => {
      loading = null;
      reject(new Error("The Label Studio editor could not be loaded (is the frontend built? run `make frontend`)."));
    };
    document.head.append(script);
  });
  return loading;
}

const nextFrame = () => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));

// Label Studio's label buttons under the image (the class names), in pixels.
const LABEL_BAR = 48;

export class NucleusEditor {
  /**
   * el: container; options: {config, imageUrl, result, taskId, user, readOnly, onChange}
   */
  constructor(el, options) {
    this.el = el;
    this.options = options;
    this.app = null;
    this.store = null;
    this.timings = {};
  }

  async mount(LabelStudio) {
    const started = performance.now();
    const { config, imageUrl, taskId, user } = this.options;
    this.el.dataset.ready = "0";
    const host = document.createElement("div");
    host.className = "ls-host";
    this.el.replaceChildren(host);
    const setWidth = () => host.style.setProperty("--tile-display-width", `${this.displayWidth()}px`);
    setWidth();
    this.onResize = setWidth;
    window.addEventListener("resize", this.onResize);
    const loaded = new Promise((resolve, reject) => {
      const timeout = setTimeout(() => reject(new Error("The editor did not start within 60 s.")), 60000);
      this.app = new LabelStudio(host, {
        config,
        interfaces: ["panel", "annotations:current"],
        user: { pk: user.id, firstName: user.username, lastName: "" },
        task: { id: taskId, data: { image: imageUrl }, annotations: [{ id: `karyo-${taskId}`, result: [] }], predictions: [] },
        onLabelStudioLoad: (store) => {
          clearTimeout(timeout);
          resolve(store);
        },
        onSubmitAnnotation: () => this.options.onSubmitShortcut?.(),
        onUpdateAnnotation: () => this.options.onSubmitShortcut?.(),
        onEntityCreate: () => this.options.onChange?.(),
        // Label Studio calls this before the region leaves its store: count after it has.
        onEntityDelete: () => setTimeout(() => this.options.onChange?.(), 0),
      });
    });
    this.store = await loaded;
    this.timings.init_ms = performance.now() - started;
    const annotation = await this.waitFor(() => {
      const a = this.store.annotationStore.selected;
      const image = a && a.names && a.names.get("image");
      return image && image.isReady ? a : null;
    }, 60000, "the tile image");
    this.timings.image_ms = performance.now() - started;
    const t0 = performance.now();
    annotation.deserializeResults(JSON.parse(JSON.stringify(this.options.result || [])));
    if (typeof annotation.reinitHistory === "function") annotation.reinitHistory();
    this.timings.regions_ms = performance.now() - t0;
    await nextFrame();
    this.timings.open_ms = performance.now() - started;
    this.el.dataset.ready = "1";
    return this;
  }

  // The tile as large as fits the panel's width and the window's height below the sticky top
  // bar (the workspace scrolls the page head away: fitTheView). It used to keep room for the
  // page head too, which left a 512 px tile 590 px wide in a 1000 px panel.
  displayWidth() {
    const { width = 512, height = 512 } = this.options;
    const availableWidth = Math.max(200, this.el.clientWidth - 56); // Label Studio's zoom tools sit to the right
    const topbar = document.querySelector(".topbar")?.offsetHeight ?? 0;
    const availableHeight = Math.max(300, window.innerHeight - topbar - LABEL_BAR - 24);
    return Math.floor(Math.min(availableWidth, (availableHeight * width) / height));
  }

  // Scroll so the editor starts just below the top bar when the tile would not fit otherwise.
  fitTheView() {
    const wrap = this.el.parentElement ?? this.el;
    const topbar = document.querySelector(".topbar")?.offsetHeight ?? 0;
    const box = wrap.getBoundingClientRect();
    if (box.top < topbar || box.top + this.displayWidth() + LABEL_BAR > window.innerHeight) {
      window.scrollTo({ top: Math.max(0, box.top + window.scrollY - topbar - 8) });
    }
  }

  async waitFor(predicate, timeout, what) {
    const deadline = performance.now() + timeout;
    for (;;) {
      const value = predicate();
      if (value) return value;
      if (performance.now() > deadline) throw new Error(`Timed out waiting for ${what}.`);
      await new Promise((resolve) => setTimeout(resolve, 16));
    }
  }

  get annotation() {
    return this.store?.annotationStore?.selected ?? null;
  }

  results() {
    const annotation = this.annotation;
    if (!annotation) return [];
    return annotation.serializeAnnotation();
  }

  regionCount() {
    return this.annotation?.regionStore?.regions?.length ?? 0;
  }

  selectedRegionIds() {
    const annotation = this.annotation;
    if (!annotation) return [];
    const selected = annotation.selectedRegions ?? [];
    return selected.map((r) => r.cleanId ?? String(r.id).replace(/#.*$/, ""));
  }

  regionIds() {
    return (this.annotation?.regionStore?.regions ?? []).map((r) => r.cleanId ?? String(r.id).replace(/#.*$/, ""));
  }

  undo() {
    this.annotation?.undo?.();
  }

  destroy() {
    if (this.onResize) window.removeEventListener("resize", this.onResize);
    try {
      this.app?.destroy?.();
    } catch {
      /* Label Studio 1.4 may throw while unmounting: the container is replaced anyway */
    }
    this.app = null;
    this.store = null;
    this.el.replaceChildren();
    this.el.dataset.ready = "0";
  }
}
