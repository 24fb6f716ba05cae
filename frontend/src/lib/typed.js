// The workspace's note on a typed prediction: the model chose each nucleus' class; the note lists
// every predicted nucleus with its class and the model's confidence in it, the least sure first,
// and counts those below LOW_CONFIDENCE (worth a look before accepting).
import { h } from "./dom.js";
import { plural, predictedNuclei } from "./format.js";

export const LOW_CONFIDENCE = 0.6;

export function typedPredictionNote(result) {
  const nuclei = predictedNuclei(result);
  const low = nuclei.filter((n) => n.score < LOW_CONFIDENCE).length;
  return h("span", { class: "note-inline", "data-testid": "typed-prediction", "data-low": low },
    ` · classes predicted by the model (${plural(low, "nucleus", "nuclei")} below ${Math.round(100 * LOW_CONFIDENCE)} % confidence: check them) `,
    h("details", { class: "typed-nuclei", "data-testid": "typed-nuclei" },
      h("summary", {}, `each nucleus' class and confidence (${nuclei.length})`),
      h("ol", { class: "typed-list" }, nuclei.map((n) =>
        h("li", { class: n.score < LOW_CONFIDENCE ? "typed-low" : null, "data-testid": "typed-nucleus", "data-id": n.id, "data-label": n.label, "data-score": n.score },
          `nucleus ${n.id}: ${n.label} · ${Math.round(100 * n.score)} %`)))));
}
