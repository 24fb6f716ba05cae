// Review: submitted annotations with their difference from the model's prediction; reviewers
// accept or reject them with a comment.
import { api } from "../lib/api.js";
import { h, replace } from "../lib/dom.js";
import { metric, plural, relativeTime, roleAtLeast, statusLabel, withArticle } from "../lib/format.js";
import { badge, card, emptyState, errorBox, projectUrl, spinner, toast } from "../lib/layout.js";

const TABS = [["submitted", "Awaiting review"], ["reviewed", "Accepted"], ["rejected", "Rejected"]];

export async function render(main, { config, socket }) {
  const { project } = config;
  const canReview = roleAtLeast(project.my_role, "reviewer");
  let status = "submitted";
  let items = [];
  let selected = config.annotation_id || null;
  const tabs = h("div", { class: "tabs", role: "tablist" });
  const list = h("ul", { class: "review-list", "data-testid": "review-list" });
  const detail = h("div", { class: "review-detail", "data-testid": "review-detail" });
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Review"),
      h("p", { class: "muted" }, "Each submission against the model's prediction: green was added by the annotator, red removed; yellow outlines are the annotation, cyan the prediction.")),
    canReview ? "" : h("div", { class: "note" }, `You are ${withArticle(project.my_role)}: you can look at submissions; accepting or rejecting needs the reviewer role.`),
    tabs,
    h("div", { class: "review" }, card(null, list, { className: "review-list-card" }), detail));

  function drawTabs() {
    replace(tabs, TABS.map(([key, label]) => h("button", {
      class: ["tab", key === status && "active"], role: "tab", onclick: () => { status = key; selected = null; load(); },
    }, label)));
  }

  async function load() {
    drawTabs();
    replace(list, spinner());
    try {
      const page = await api(`/api/projects/${project.id}/review/?status=${status}&limit=100`);
      items = page.results;
    } catch (error) {
      replace(list, errorBox(error));
      return;
    }
    if (!items.length) {
      replace(list, h("li", {}, emptyState(status === "submitted" ? "Nothing to review" : "None yet",
        status === "submitted" ? "Submitted corrections appear here. Annotators work from the queue." : null)));
      replace(detail);
      return;
    }
    replace(list, items.map((a) => h("li", {
      class: ["review-item", a.id === selected && "active"], "data-testid": "review-item", "data-id": a.id, onclick: () => show(a.id),
    }, h("img", { src: `/api/annotations/${a.id}/diff.png?size=96`, alt: "", loading: "lazy" }),
    h("div", {}, h("div", {}, h("strong", {}, `tile ${a.tile}`), ` v${a.version}`),
      h("div", { class: "small muted" }, `${a.author ?? "?"} · ${plural(a.nucleus_count, "nucleus", "nuclei")} · ${relativeTime(a.created_at)}`)))));
    if (!items.some((a) => a.id === selected)) selected = items[0].id;
    show(selected);
  }

  async function show(id) {
    selected = id;
    for (const li of list.querySelectorAll(".review-item")) li.classList.toggle("active", Number(li.dataset.id) === id);
    replace(detail, spinner());
    let data;
    try {
      data = await api(`/api/annotations/${id}/diff/`);
    } catch (error) {
      replace(detail, errorBox(error));
      return;
    }
    const a = data.annotation;
    const d = data.diff;
    const comment = h("textarea", { rows: 3, placeholder: "Comment (required when rejecting)", "data-testid": "review-comment" });
    const decide = async (decision) => {
      if (decision === "reject" && !comment.value.trim()) {
        toast("Say what to fix: a comment is required when rejecting.", "error");
        comment.focus();
        return;
      }
      try {
        await api(`/api/annotations/${id}/review/`, { method: "POST", body: { decision, comment: comment.value.trim() } });
        toast(decision === "accept" ? `Accepted tile ${a.tile} v${a.version}.` : `Rejected tile ${a.tile} v${a.version}.`, "ok");
        selected = null;
        load();
      } catch (error) {
        toast(error.message, "error");
      }
    };
    replace(detail, card(`Tile ${a.tile} · version ${a.version}`, h("div", {},
      h("div", { class: "review-body" },
        h("div", { class: "diff-image" }, h("img", { src: `/api/annotations/${id}/diff.png`, alt: "annotation against prediction", "data-testid": "diff-image" }),
          h("div", { class: "legend-row small" },
            h("span", { class: "legend-item" }, h("i", { class: "dot", style: { background: "#28c846" } }), "added"),
            h("span", { class: "legend-item" }, h("i", { class: "dot", style: { background: "#e6283c" } }), "removed"),
            h("span", { class: "legend-item" }, h("i", { class: "dot", style: { background: "#ffdc00" } }), "annotation"),
            h("span", { class: "legend-item" }, h("i", { class: "dot", style: { background: "#00c8ff" } }), data.reference ? data.reference.label : "reference"))),
        h("div", { class: "diff-stats" },
          h("p", {}, `By ${a.author ?? "?"}, ${relativeTime(a.created_at)} · `, badge(a.status, statusLabel(a.status))),
          data.reference
            ? h("table", { class: "kv", "data-testid": "diff-stats" },
              h("tr", {}, h("th", {}, "Compared with"), h("td", {}, data.reference.label)),
              h("tr", {}, h("th", {}, "Nuclei"), h("td", {}, `${d.nuclei} (prediction ${d.reference_nuclei})`)),
              h("tr", {}, h("th", {}, "Unchanged"), h("td", {}, String(d.unchanged))),
              h("tr", {}, h("th", {}, "Reshaped"), h("td", {}, String(d.reshaped))),
              h("tr", {}, h("th", {}, "Added"), h("td", {}, String(d.added))),
              h("tr", {}, h("th", {}, "Removed"), h("td", {}, String(d.removed))),
              h("tr", {}, h("th", {}, "Pixel Dice"), h("td", {}, metric(d.pixel_dice))))
            : h("p", { class: "muted" }, "No prediction or earlier version to compare with: this annotation was drawn from scratch."),
          a.review_comment ? h("p", { class: "comment" }, `“${a.review_comment}” — ${a.reviewed_by}`) : null,
          h("a", { class: "link", href: projectUrl(project, `tiles/${a.tile}/`) }, "Open in the editor →"),
          canReview && a.status === "submitted"
            ? h("div", { class: "decide" }, comment,
              h("div", { class: "actions" },
                h("button", { class: "btn btn-primary", "data-testid": "accept", onclick: () => decide("accept") }, "Accept"),
                h("button", { class: "btn btn-danger", "data-testid": "reject", onclick: () => decide("reject") }, "Reject")))
            : null)))));
  }

  await load();
  let timer = null;
  socket?.subscribe((event) => {
    if (event.kind !== "queue.changed") return;
    clearTimeout(timer);
    timer = setTimeout(() => status === "submitted" && load(), 1000);
  });
}
