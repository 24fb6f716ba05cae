from django.urls import path
from . import api
from .auth import TokenLoginView

urlpatterns = [
    path("auth/token/", TokenLoginView.as_view(), name="auth-token"),
    path("me/", api.MeView.as_view(), name="me"),
    path("projects/", api.ProjectListView.as_view(), name="project-list"),
    path("projects/<int:project_id>/", api.ProjectDetailView.as_view(), name="project-detail"),
    path("projects/<int:project_id>/archive/", api.ProjectArchiveView.as_view(), name="project-archive"),
    path("projects/<int:project_id>/members/", api.MembershipListView.as_view(), name="membership-list"),
    path("projects/<int:project_id>/members/<int:membership_id>/", api.MembershipDetailView.as_view(), name="membership-detail"),
]
