from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from .views import healthz

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("", include("backend.web.urls")),  # the browser UI: pages, and its API under api/
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("api/", include("backend.projects.urls")),
    path("api/", include("backend.images.urls")),
    path("api/", include("backend.ml.urls")),
    path("api/", include("backend.exports.urls")),
    path("", include("backend.labelstudio.urls")),
]

handler404 = "backend.karyo.views.not_found"
handler403 = "backend.karyo.views.forbidden"
