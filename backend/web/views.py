"""Pages: sign in/out and the app shell. Every page but the sign-in form needs a signed-in
user, and every project page membership of that project (outsiders get 404, as in the API)."""
from __future__ import annotations

import math

from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import get_object_or_404, render
from django.views.decorators.csrf import ensure_csrf_cookie

from backend.common.throttling import login_wait, record_failed_login
from backend.images.models import Annotation, Image, Tile
from backend.projects.models import ROLE_RANK, Project, Role
from backend.projects.selectors import role_of
from ml_worker import catalog

from .assets import entry_assets, label_studio_assets

LOGIN_URL = "/login/"
PAGES = {
    "projects": "Projects",
    "dashboard": "Dashboard",
    "queue": "Queue",
    "workspace": "Correct",
    "review": "Review",
    "training": "Training",
    "models": "Models",
    "exports": "Exports",
    "images": "Images",
    "upload": "Upload",
    "slide": "Slide",
    "new_project": "New project",
    "settings": "Settings",
}


class LoginView(auth_views.LoginView):
    template_name = "login.html"
    redirect_authenticated_user = True
    next_page = "/"  # without ?next=: the project list (settings.LOGIN_REDIRECT_URL is Django's /accounts/profile/)

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs), "assets": entry_assets()}

    def post(self, request, *args, **kwargs):
        # The same failed-attempt throttle as POST /api/auth/token/ (backend.common.throttling).
        wait = login_wait(request)
        if wait is not None:
            response = self.render_to_response(self.get_context_data(throttled=math.ceil(wait)))
            response.status_code = 429
            response["Retry-After"] = str(math.ceil(wait))
            return response
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        record_failed_login(self.request)
        return super().form_invalid(form)


class LogoutView(auth_views.LogoutView):
    next_page = LOGIN_URL


class SetPasswordView(auth_views.PasswordResetConfirmView):
    """The one-time link of an invitation (backend/projects/invitations.py): Django's
    password-reset token, valid until the password is set. Signs the new member in."""

    template_name = "set_password.html"
    post_reset_login = True
    success_url = "/"

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs), "assets": entry_assets()}


def _shell(request, page: str, *, project: Project | None = None, role: Role | None = None, **extra):
    user = request.user
    context = {
        "page": page,
        "user": {"id": user.pk, "username": user.username, "is_staff": user.is_staff, "is_superuser": user.is_superuser},
        "project": None if project is None else {"id": project.pk, "name": project.name, "my_role": role.value if role else None,
                                                  "nucleus_classes": project.nucleus_classes},
        "label_studio": label_studio_assets(),
        **extra,
    }
    title = PAGES[page] + (f" · {project.name}" if project else "")
    return render(request, "index.html", {"config": context, "assets": entry_assets(), "title": title})


def _member_project(request, project_id: int) -> tuple[Project, Role]:
    project = get_object_or_404(Project, pk=project_id)
    role = role_of(user=request.user, project=project)
    if role is None:
        raise Http404("no such project")
    return project, role


@login_required(login_url=LOGIN_URL)
@ensure_csrf_cookie
def projects_page(request):
    return _shell(request, "projects")


@login_required(login_url=LOGIN_URL)
@ensure_csrf_cookie
def project_page(request, project_id: int, page: str = "dashboard"):
    project, role = _member_project(request, project_id)
    return _shell(request, page, project=project, role=role)


@login_required(login_url=LOGIN_URL)
@ensure_csrf_cookie
def new_project_page(request):
    if not request.user.is_staff:
        raise PermissionDenied("Only platform staff create projects. Ask an administrator to create one and add you.")
    return _shell(request, "new_project", catalog=catalog.as_dict())


@login_required(login_url=LOGIN_URL)
@ensure_csrf_cookie
def settings_page(request, project_id: int):
    project, role = _member_project(request, project_id)
    if role != Role.ADMIN:
        article = "an" if role.value[0] in "aeiou" else "a"
        raise PermissionDenied(f"Only the project's admins change its settings and members; you are {article} {role.value}.")
    return _shell(request, "settings", project=project, role=role, catalog=catalog.as_dict())


@login_required(login_url=LOGIN_URL)
@ensure_csrf_cookie
def upload_page(request, project_id: int):
    project, role = _member_project(request, project_id)
    if role != Role.ADMIN:
        raise PermissionDenied(f"Only the project's admins upload slides; you are {role.label.lower()}.")
    return _shell(request, "upload", project=project, role=role)


@login_required(login_url=LOGIN_URL)
@ensure_csrf_cookie
def slide_page(request, project_id: int, image_id: int):
    project, role = _member_project(request, project_id)
    image = get_object_or_404(Image, pk=image_id, project=project)
    return _shell(request, "slide", project=project, role=role, image_id=image.pk)


@login_required(login_url=LOGIN_URL)
@ensure_csrf_cookie
def workspace_page(request, project_id: int, tile_id: int):
    project, role = _member_project(request, project_id)
    tile = get_object_or_404(Tile, pk=tile_id, project=project)
    return _shell(request, "workspace", project=project, role=role, tile_id=tile.pk,
                  can_edit=ROLE_RANK[role] >= ROLE_RANK[Role.ANNOTATOR])


@login_required(login_url=LOGIN_URL)
@ensure_csrf_cookie
def review_page(request, project_id: int, annotation_id: int | None = None):
    project, role = _member_project(request, project_id)
    if annotation_id is not None:
        get_object_or_404(Annotation, pk=annotation_id, tile__project=project)
    return _shell(request, "review", project=project, role=role, annotation_id=annotation_id)
