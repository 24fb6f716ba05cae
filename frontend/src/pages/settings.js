// A project's settings (admins): the settings form, members (invite by username or e-mail,
// change a role, remove), archive/restore.
import { api } from "../lib/api.js";
import { h, replace } from "../lib/dom.js";
import { ROLES, relativeTime } from "../lib/format.js";
import { card, errorBox, spinner, toast } from "../lib/layout.js";
import { projectForm } from "../lib/project_form.js";

export async function render(main, { config }) {
  const id = config.project.id;
  const formSlot = h("div", {}, spinner());
  const membersSlot = h("div", {}, spinner());
  const archiveSlot = h("div");
  const banner = h("div");
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Settings"),
      h("p", { class: "muted" }, "What the project annotates and how its models train; who works on it.")),
    banner,
    h("div", { class: "settings-grid" },
      card("Project", formSlot),
      h("div", {}, card("Members", membersSlot, { id: "members" }), card("Archive", archiveSlot))));
  if (new URLSearchParams(location.search).get("created")) {
    banner.append(h("div", { class: "note note-ok", "data-testid": "created-note" }, "Project created. Invite its members below."));
  }
  let project;
  try {
    project = await api(`/api/projects/${id}/`);
  } catch (error) {
    replace(formSlot, errorBox(error, () => location.reload()));
    return;
  }
  const drawForm = () => {
    drawFormInner();
    // An archived project is read-only (the API refuses changes): so is its form.
    if (project.archived_at) for (const el of formSlot.querySelectorAll("input, select, textarea, button")) el.disabled = true;
  };
  const drawFormInner = () => replace(formSlot, projectForm({
    project, catalog: config.catalog, tilingLocked: (project.tile_count ?? 0) > 0 || project.image_count > 0,
    submitLabel: "Save settings",
    onSubmit: async (body) => {
      project = await api(`/api/projects/${id}/`, { method: "PATCH", body });
      toast("Settings saved.", "ok");
      drawForm();
    },
  }));
  const drawArchive = () => {
    const archived = !!project.archived_at;
    if (archived) {
      replace(banner, h("div", { class: "archived-banner", "data-testid": "archived-banner" },
        `Archived ${relativeTime(project.archived_at)}: read-only, no work is served and no training starts.`));
    }
    replace(archiveSlot,
      h("p", { class: "muted" }, archived
        ? "Restore the project to change its settings and serve work again."
        : "An archived project keeps everything (images, annotations, models, exports) but is read-only."),
      h("button", { class: archived ? "btn" : "btn btn-danger", "data-testid": archived ? "restore" : "archive", onclick: async () => {
        try {
          project = await api(`/api/projects/${id}/archive/`, { method: archived ? "DELETE" : "POST" });
          if (!project.archived_at) replace(banner);
          toast(project.archived_at ? "Project archived." : "Project restored.", "ok");
          drawArchive();
          drawForm();
        } catch (error) {
          toast(error.message, "error");
        }
      } }, archived ? "Restore project" : "Archive project"));
  };
  drawForm();
  drawArchive();
  await drawMembers(membersSlot, id, config.user);
}

async function drawMembers(slot, projectId, me) {
  let members;
  try {
    members = await api(`/api/projects/${projectId}/members/`);
  } catch (error) {
    replace(slot, errorBox(error));
    return;
  }
  const redraw = () => drawMembers(slot, projectId, me);
  const roleSelect = (member) => h("select", { "aria-label": `role of ${member.username}`, "data-testid": "member-role",
    onchange: async (event) => {
      try {
        await api(`/api/projects/${projectId}/members/${member.id}/`, { method: "PATCH", body: { role: event.target.value } });
        toast(`${member.username} is now ${event.target.value}.`, "ok");
      } catch (error) {
        toast(error.message, "error");
      }
      redraw();
    } }, ROLES.map((r) => h("option", { value: r, selected: r === member.role }, r)));
  const table = h("table", { class: "table", "data-testid": "members" },
    h("thead", {}, h("tr", {}, h("th", {}, "Member"), h("th", {}, "Role"), h("th", {}, "Since"), h("th", {}))),
    h("tbody", {}, members.map((m) => h("tr", { "data-testid": "member", dataset: { username: m.username } },
      h("td", {}, h("strong", {}, m.username), m.email ? h("div", { class: "muted small" }, m.email) : null),
      h("td", {}, roleSelect(m)),
      h("td", { class: "muted small" }, relativeTime(m.created_at)),
      h("td", {}, m.username === me.username ? null : h("button", { class: "btn btn-ghost btn-small", "data-testid": "remove-member",
        onclick: async () => {
          try {
            await api(`/api/projects/${projectId}/members/${m.id}/`, { method: "DELETE" });
            toast(`${m.username} removed.`, "ok");
          } catch (error) {
            toast(error.message, "error");
          }
          redraw();
        } }, "Remove"))))));
  replace(slot, table, inviteForm(projectId, redraw));
}

function inviteForm(projectId, onInvited) {
  const result = h("div", { "data-testid": "invite-result" });
  const who = h("input", { type: "text", name: "who", placeholder: "username or e-mail", required: true, "data-testid": "invite-who" });
  const role = h("select", { name: "role", "data-testid": "invite-role" }, ROLES.map((r) => h("option", { value: r, selected: r === "annotator" }, r)));
  const form = h("form", { class: "form", "data-testid": "invite-form", style: { marginTop: "14px" } },
    h("h3", {}, "Invite"),
    h("div", { class: "field-row" }, h("label", { class: "field" }, who), h("label", { class: "field", style: { flex: "0 0 130px" } }, role),
      h("button", { type: "submit", class: "btn btn-primary", "data-testid": "invite" }, "Invite")),
    h("span", { class: "field-help" }, "Someone without an account gets one, with a one-time link to choose a password (e-mailed when Karyo has an SMTP server)."),
    result);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = who.value.trim();
    if (!value) return;
    const body = { role: role.value, ...(value.includes("@") ? { email: value } : { username: value }) };
    try {
      const invited = await api(`/api/projects/${projectId}/members/`, { method: "POST", body });
      await onInvited();
      // onInvited redraws the panel (and this form): show the outcome in the new one.
      const slot = document.querySelector("[data-testid=invite-result]");
      replace(slot, invitationNote(invited));
    } catch (error) {
      replace(result, h("div", { class: "form-errors", role: "alert" }, error.message));
    }
  });
  return form;
}

function invitationNote(invited) {
  if (invited.emailed) return h("div", { class: "note note-ok" }, `${invited.username} was added and e-mailed a link to choose a password.`);
  if (!invited.set_password_url) return h("div", { class: "note note-ok" }, `${invited.username} was added as ${invited.role}.`);
  const input = h("input", { type: "text", readonly: true, value: invited.set_password_url, "data-testid": "set-password-link" });
  return h("div", { class: "note note-warn" },
    h("div", {}, `${invited.account_created ? "Account created" : "Added"}: `, h("strong", {}, invited.username),
      ` (${invited.role}). No e-mail server is configured: send them this one-time link to choose a password.`),
    h("div", { class: "link-box" }, input, h("button", { type: "button", class: "btn btn-small", onclick: async () => {
      input.select();
      try { await navigator.clipboard.writeText(input.value); toast("Link copied.", "ok"); } catch { document.execCommand?.("copy"); }
    } }, "Copy")));
}
