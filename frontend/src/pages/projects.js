// The projects the user is a member of.
import { listAll } from "../lib/api.js";
import { h, replace } from "../lib/dom.js";
import { relativeTime } from "../lib/format.js";
import { emptyState, errorBox, spinner } from "../lib/layout.js";

export async function render(main, { config }) {
  const list = h("div", { class: "project-grid" }, spinner("Loading projects…"));
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Projects"),
      h("p", { class: "muted" }, `Signed in as ${config.user.username}. Pick a project to annotate, review or train.`)),
    list,
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
        ? "Create one in the API (POST /api/projects/) or the admin site, or run `make run` to seed the demo projects."
        : "You are not a member of any project. Ask a project admin to add you."));
    return;
  }
  replace(list, projects.map((p) =>
    h("a", { class: "project-card", href: `/projects/${p.id}/`, "data-testid": "project-card" },
      h("div", { class: "project-card-head" }, h("h2", {}, p.name), p.my_role ? h("span", { class: `role role-${p.my_role}` }, p.my_role) : null),
      h("p", { class: "muted clamp" }, p.description || "No description."),
      h("div", { class: "project-stats" },
        h("span", {}, h("strong", {}, p.image_count ?? "—"), " images"),
        h("span", {}, h("strong", {}, p.tile_count ?? "—"), " tiles"),
        h("span", {}, "classes: ", (p.nucleus_classes || []).map((c) => h("i", { class: "swatch", style: { background: c.color }, title: c.name })))),
      h("div", { class: "muted small" }, `created ${relativeTime(p.created_at)}`))));
}
