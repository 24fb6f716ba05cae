import { describe, it } from "node:test";
import { expect } from "./expect.js";
import { addMerge, cleanId, labelOf, planEdits, pruneMerges, samePoints } from "../src/lib/edits.js";

const poly = (id, points, label = "nucleus") => ({ id, type: "polygonlabels", from_name: "nuclei", to_name: "image", value: { points, closed: true, polygonlabels: [label] } });
const square = (x, y, s = 2) => [[x, y], [x + s, y], [x + s, y + s], [x, y + s]];

describe("region ids", () => {
  it("reads the instance id of k<label>p<piece>, and of older n<label> and n<label>p<part>, with Label Studio's #suffix", () => {
    expect(labelOf("k12p1")).toBe(12);
    expect(labelOf("k12p3#karyo-1")).toBe(12);
    expect(labelOf("n12")).toBe(12);
    expect(labelOf("n12p1")).toBe(12);
    expect(labelOf("n7#karyo-3")).toBe(7);
    expect(labelOf("aB3x_9kP")).toBeNull();
    expect(cleanId("n7#karyo-3")).toBe("n7");
  });
  it("compares points with a tolerance", () => {
    expect(samePoints(square(1, 1), square(1, 1).map(([x, y]) => [x + 1e-4, y]))).toBe(true);
    expect(samePoints(square(1, 1), square(1.1, 1))).toBe(false);
    expect(samePoints(square(1, 1), square(1, 1).slice(0, 3))).toBe(false);
  });
});

describe("planEdits sends only what changed", () => {
  const initial = [poly("n1", square(1, 1)), poly("n2", square(5, 5)), poly("n3", square(9, 9)), poly("n3p1", square(20, 20))];

  it("sends nothing for an untouched tile", () => {
    const plan = planEdits(initial, initial.map((r) => ({ ...r, id: `${r.id}#a1` })));
    expect(plan.regions).toEqual([]);
    expect(plan.deleted).toEqual([]);
    expect(plan.stats).toEqual({ reshaped: 0, added: 0, deleted: 0, merged: 0 });
  });

  it("sends a reshaped nucleus, deletes a removed one, and adds a drawn one", () => {
    const current = [
      poly("n1", [[1, 1], [4, 1], [4, 4], [1, 3]]),
      poly("n3", square(9, 9)),
      poly("n3p1", square(20, 20)),
      poly("xYz12", square(30, 30)),
    ];
    const plan = planEdits(initial, current);
    expect(plan.regions.map((r) => r.id)).toEqual(["n1", "xYz12"]);
    expect(plan.deleted).toEqual([2]);
    expect(plan.stats).toMatchObject({ reshaped: 1, added: 1, deleted: 1 });
  });

  it("sends every part of a nucleus when one part changed or disappeared", () => {
    const moved = planEdits(initial, [initial[0], initial[1], initial[2], poly("n3p1", square(21, 20))]);
    expect(moved.regions.map((r) => r.id)).toEqual(["n3", "n3p1"]);
    const lost = planEdits(initial, [initial[0], initial[1], initial[2]]);
    expect(lost.regions.map((r) => r.id)).toEqual(["n3"]);
    expect(lost.deleted).toEqual([]);
  });

  it("counts a class change as a change", () => {
    const plan = planEdits(initial, [poly("n1", square(1, 1), "lymphocyte"), ...initial.slice(1)]);
    expect(plan.regions.map((r) => r.id)).toEqual(["n1"]);
  });

  it("passes merge groups of at least two distinct ids", () => {
    const plan = planEdits(initial, initial, [["n1#a", "n2"], ["n3", "n3#b"]]);
    expect(plan.merges).toEqual([["n1", "n2"]]);
    expect(plan.stats.merged).toBe(1);
  });
});

describe("merge groups", () => {
  it("joins groups that share a region and names the nucleus after a known id", () => {
    let groups = addMerge([], ["abc", "n4"]);
    expect(groups).toEqual([["n4", "abc"]]);
    groups = addMerge(groups, ["n4", "n9"]);
    expect(groups).toEqual([["n4", "n9", "abc"]]);
    expect(addMerge(groups, ["n1"])).toBe(groups);
  });
  it("forgets regions that were deleted", () => {
    expect(pruneMerges([["n1", "n2", "n3"], ["n5", "n6"]], ["n1", "n3", "n5"])).toEqual([["n1", "n3"]]);
  });
});
