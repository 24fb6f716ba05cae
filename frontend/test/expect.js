// A few jest-style matchers over node:assert, for the `node --test` runner.
import assert from "node:assert/strict";

export function expect(actual) {
  return {
    toBe: (expected) => assert.strictEqual(actual, expected),
    toEqual: (expected) => assert.deepStrictEqual(actual, expected),
    toMatchObject: (expected) => {
      for (const [key, value] of Object.entries(expected)) assert.deepStrictEqual(actual[key], value, `key ${key}`);
    },
    toContain: (part) => assert.ok(actual.includes(part), `${JSON.stringify(actual).slice(0, 200)} does not contain ${JSON.stringify(part)}`),
    toMatch: (re) => assert.match(actual, re),
    toHaveLength: (n) => assert.strictEqual(actual.length, n),
    toBeNull: () => assert.strictEqual(actual, null),
    toBeLessThan: (n) => assert.ok(actual < n, `${actual} < ${n}`),
    toBeGreaterThan: (n) => assert.ok(actual > n, `${actual} > ${n}`),
    toBeLessThanOrEqual: (n) => assert.ok(actual <= n, `${actual} <= ${n}`),
    toBeGreaterThanOrEqual: (n) => assert.ok(actual >= n, `${actual} >= ${n}`),
    not: {
      toContain: (part) => assert.ok(!actual.includes(part), `${JSON.stringify(actual).slice(0, 200)} contains ${JSON.stringify(part)}`),
    },
  };
}
