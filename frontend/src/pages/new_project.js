// "New project" (platform staff): the settings form; the creator becomes the project's admin
// and lands on its settings page to invite members.
import { api } from "../lib/api.js";
import { h } from "../lib/dom.js";
import { card } from "../lib/layout.js";
import { projectForm } from "../lib/project_form.js";

export async function render(main, { config }) {
  const form = projectForm({
    project: {}, catalog: config.catalog, submitLabel: "Create project",
    onSubmit: async (body) => {
      const project = await api("/api/projects/", { method: "POST", body });
      location.assign(`/projects/${project.id}/settings/?created=1`);
    },
  });
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "New project"),
      h("p", { class: "muted" }, "You become its admin. Next: invite members, then upload images.")),
    h("div", { class: "settings-grid" }, card("Settings", form), card("What happens next", h("ol", { class: "muted" },
      h("li", {}, "Invite annotators, reviewers and viewers on the project's settings page (by username or e-mail)."),
      h("li", {}, "Upload images: Karyo cuts them into tiles of the size chosen here."),
      h("li", {}, "Annotate a few tiles, accept them in review, and launch the first training run.")))));
}
