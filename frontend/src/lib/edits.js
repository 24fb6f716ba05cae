// What the correction workspace sends on submit: only what changed (see backend/web/editing.py).
//
// The editor opens polygons with ids k<label>p<piece> (backend/common/geometry.py; the n<label>
// and n<label>p<k> ids of older tasks are read too).
// On submit we compare the editor's regions with those it opened:
//   * a nucleus whose parts all disappeared          -> `deleted`
//   * a nucleus with a part reshaped, relabelled, added or removed -> all its current parts in `regions`
//   * a region with any other id (drawn by hand)     -> `regions` (a new nucleus)
//   * merge groups (region ids)                      -> `merges`
// Untouched nuclei are not sent: the server keeps their pixels exactly.

const REGION_ID = /^[kn](\d+)(?:p(\d+))?$/;

export function labelOf(regionId) {
  const match = REGION_ID.exec(String(regionId ?? "").replace(/#.*$/, ""));
  return match ? Number(match[1]) : null;
}

export function cleanId(regionId) {
  return String(regionId ?? "").replace(/#.*$/, "");
}

export function samePoints(a, b, tolerance = 1e-3) {
  if (!Array.isArray(a) || !Array.isArray(b) || a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    if (Math.abs(a[i][0] - b[i][0]) > tolerance || Math.abs(a[i][1] - b[i][1]) > tolerance) return false;
  }
  return true;
}

function labelsOf(region) {
  return JSON.stringify(region?.value?.polygonlabels ?? []);
}

function polygons(results) {
  return (results || []).filter((r) => r && r.type === "polygonlabels" && Array.isArray(r.value?.points));
}

/**
 * initial: the results the editor was opened with; current: the editor's results now;
 * merges: arrays of region ids to join. Returns {regions, deleted, merges, stats}.
 */
export function planEdits(initial, current, merges = []) {
  const before = new Map();
  for (const r of polygons(initial)) before.set(cleanId(r.id), r);
  const beforeByLabel = new Map();
  for (const [id, r] of before) {
    const label = labelOf(id);
    if (label === null) continue;
    if (!beforeByLabel.has(label)) beforeByLabel.set(label, []);
    beforeByLabel.get(label).push(r);
  }
  const nowByLabel = new Map();
  const drawn = [];
  for (const r of polygons(current)) {
    const id = cleanId(r.id);
    const label = labelOf(id);
    if (label !== null && beforeByLabel.has(label)) {
      if (!nowByLabel.has(label)) nowByLabel.set(label, []);
      nowByLabel.get(label).push({ ...r, id });
    } else {
      drawn.push({ ...r, id });
    }
  }
  const regions = [];
  const deleted = [];
  let reshaped = 0;
  for (const [label, parts] of beforeByLabel) {
    const now = nowByLabel.get(label) || [];
    if (!now.length) {
      deleted.push(label);
      continue;
    }
    const changed = now.length !== parts.length || now.some((r) => {
      const old = before.get(r.id);
      return !old || !samePoints(old.value.points, r.value.points) || labelsOf(old) !== labelsOf(r);
    });
    if (changed) {
      reshaped += 1;
      regions.push(...now);
    }
  }
  regions.push(...drawn);
  const groups = (merges || [])
    .map((group) => [...new Set(group.map(cleanId))])
    .filter((group) => group.length >= 2);
  return {
    regions,
    deleted,
    merges: groups,
    stats: { reshaped, added: drawn.length, deleted: deleted.length, merged: groups.reduce((n, g) => n + g.length - 1, 0) },
  };
}

// Merge groups after a new merge of `ids`: groups sharing a member are joined.
export function addMerge(groups, ids) {
  const clean = [...new Set(ids.map(cleanId))];
  if (clean.length < 2) return groups;
  let merged = [...clean];
  const rest = [];
  for (const group of groups) {
    if (group.some((id) => merged.includes(id))) merged = [...new Set([...merged, ...group])];
    else rest.push(group);
  }
  // The first id names the nucleus: prefer one the server knows (n<label>).
  merged.sort((a, b) => (labelOf(a) === null) - (labelOf(b) === null));
  return [...rest, merged];
}

// Drop ids of regions that no longer exist from merge groups (a merged region was deleted).
export function pruneMerges(groups, existingIds) {
  const alive = new Set([...existingIds].map(cleanId));
  return groups.map((g) => g.filter((id) => alive.has(id))).filter((g) => g.length >= 2);
}
