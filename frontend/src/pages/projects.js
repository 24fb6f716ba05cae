// The projects the user is a member of.
import { listAll } from "../lib/api.js";
import { h, replace } from "../lib/dom.js";
import { relativeTime } from "../lib/format.js";
import { emptyState, errorBox, spinner } from "../lib/layout.js";

export async function render(main, { config }) {
  const list = h("div", { class: "project-grid" }, spinner("Loading projects…"));
  const archivedList = h("div", { class: "project-grid" });
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Projects"),
      h("p", { class: "muted" }, `Signed in as ${config.user.username}. Pick a project to annotate, review or train.`),
      config.user.is_staff
        ? h("div", { class: "head-actions" }, h("a", { class: "btn btn-primary", href: "/projects/new/", "data-testid": "new-project" }, "+ New project"))
        : null),
    list,
    archivedList,
  );
  let projects;
  try {
    projects = await listAll("/api/projects/");
  } catch (error) {
    replace(list, errorBox(error, () => location.reload()));
    return;
  }
  if (!projects.length) {
    replace(list, emptyState("No projects yet",
      config.user.is_staff
        ? "Create one with “New project” above (or run `make run`, which seeds the demo projects)."
        : "You are not a member of any project. Ask a project admin to add you."));
    return;
  }
  const archived = projects.filter((p) => p.archived_at);
  if (archived.length) {
    replace(archivedList, h("h3", { style: { gridColumn: "1 / -1" } }, "Archived"), archived.map(projectCard));
  }
  const current = projects.filter((p) => !p.archived_at);
  replace(list, current.length ? current.map(projectCard) : emptyState("Every project is archived", "Open one below to restore it."));
}

function projectCard(p) {
  return h("a", { class: "project-card", href: `/projects/${p.id}/`, "data-testid": "project-card" },
    h("div", { class: "project-card-head" }, h("h2", {}, p.name), p.my_role ? h("span", { class: `role role-${p.my_role}` }, p.my_role) : null),
      h("p", { class: "muted clamp" }, p.description || "No description."),
      h("div", { class: "project-stats" },
        h("span", {}, h("strong", {}, p.image_count ?? "—"), " images"),
        h("span", {}, h("strong", {}, p.tile_count ?? "—"), " tiles"),
        h("span", {}, "classes: ", (p.nucleus_classes || []).map((c) => h("i", { class: "swatch", style: { background: c.color }, title: c.name })))),
      h("div", { class: "muted small" }, `created ${relativeTime(p.created_at)}`));
}
