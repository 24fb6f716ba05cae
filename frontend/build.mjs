// Karyo's frontend build, Node's standard library only (no bundler: the npm registry this
// project is built from lacks the per-platform binaries that esbuild/rollup need).
//
// src/ holds plain ES modules that browsers load as they are. The build copies them into
// dist/app-<hash>/ — the hash covers every source file, so a changed file gives new URLs and
// browsers never mix old and new modules — copies Label Studio's prebuilt editor (main.js,
// main.css) into dist/vendor/, and writes dist/manifest.json, which the Django pages read
// (backend/web/assets.py) to know what to load.
import { createHash } from "node:crypto";
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const src = join(here, "src");
const dist = join(here, "dist");
const LABEL_STUDIO = "1.4.0";
const lsBuild = join(here, "node_modules/@heartexlabs/label-studio/build/static");

function files(dir) {
  return readdirSync(dir).sort().flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? files(path) : [path];
  });
}

const sources = files(src).filter((f) => /\.(js|css)$/.test(f));
const hash = createHash("sha256");
for (const file of sources) hash.update(relative(src, file)).update("\0").update(readFileSync(file)).update("\0");
// uPlot (the charts) is copied into the app folder (lib/plot.js imports it relatively): its
// version is part of the hash so a new uPlot gives new URLs too.
const UPLOT = JSON.parse(readFileSync(join(here, "node_modules/uplot/package.json"), "utf8")).version;
hash.update(`uplot@${UPLOT}`);
const version = hash.digest("hex").slice(0, 12);

if (!existsSync(join(lsBuild, "js/main.js"))) {
  console.error("Label Studio's editor is missing: run `npm ci` in frontend/ first (or `make frontend`).");
  process.exit(1);
}
rmSync(dist, { recursive: true, force: true });
const app = join(dist, `app-${version}`);
for (const file of sources) {
  const target = join(app, relative(src, file));
  mkdirSync(dirname(target), { recursive: true });
  cpSync(file, target);
}
const uplotVendor = join(app, "vendor/uplot");
mkdirSync(uplotVendor, { recursive: true });
for (const name of ["uPlot.esm.js", "uPlot.min.css"]) cpSync(join(here, "node_modules/uplot/dist", name), join(uplotVendor, name));
cpSync(join(here, "node_modules/uplot/LICENSE"), join(uplotVendor, "LICENSE"));
const vendor = join(dist, `vendor/label-studio-${LABEL_STUDIO}`);
mkdirSync(vendor, { recursive: true });
cpSync(join(lsBuild, "js/main.js"), join(vendor, "main.js"));
cpSync(join(lsBuild, "js/main.js.LICENSE.txt"), join(vendor, "main.js.LICENSE.txt"));
cpSync(join(lsBuild, "css/main.css"), join(vendor, "main.css"));
// OpenSeadragon (the slide viewer): its UMD build and button images, loaded by pages/slide.js.
const OPENSEADRAGON = JSON.parse(readFileSync(join(here, "node_modules/openseadragon/package.json"), "utf8")).version;
const osdBuild = join(here, "node_modules/openseadragon/build/openseadragon");
if (!existsSync(join(osdBuild, "openseadragon.min.js"))) {
  console.error("OpenSeadragon is missing: run `npm ci` in frontend/ first (or `make frontend`).");
  process.exit(1);
}
const osdVendor = join(dist, `vendor/openseadragon-${OPENSEADRAGON}`);
mkdirSync(osdVendor, { recursive: true });
cpSync(join(osdBuild, "openseadragon.min.js"), join(osdVendor, "openseadragon.min.js"));
cpSync(join(here, "node_modules/openseadragon/LICENSE.txt"), join(osdVendor, "LICENSE.txt"));
cpSync(join(osdBuild, "images"), join(osdVendor, "images"), { recursive: true });
const manifest = {
  version,
  entry: `app-${version}/main.js`,
  css: [`app-${version}/styles.css`],
  openseadragon: { version: OPENSEADRAGON, js: `vendor/openseadragon-${OPENSEADRAGON}/openseadragon.min.js`, images: `vendor/openseadragon-${OPENSEADRAGON}/images/` },
  label_studio: { version: LABEL_STUDIO, js: `vendor/label-studio-${LABEL_STUDIO}/main.js`, css: `vendor/label-studio-${LABEL_STUDIO}/main.css` },
};
writeFileSync(join(dist, "manifest.json"), JSON.stringify(manifest, null, 2) + "\n");
console.log(`frontend built: dist/app-${version}/ (${sources.length} files), Label Studio ${LABEL_STUDIO}`);
