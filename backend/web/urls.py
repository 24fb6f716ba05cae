"""Pages at the site root and the UI's API under /api/ (included once, at "", in karyo/urls.py)."""
from django.urls import path

from . import api, slides, views

urlpatterns = [
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", views.LogoutView.as_view(), name="logout"),
    path("set-password/<uidb64>/<token>/", views.SetPasswordView.as_view(), name="set-password"),
    path("", views.projects_page, name="web-projects"),
    path("projects/new/", views.new_project_page, name="web-new-project"),
    path("projects/<int:project_id>/settings/", views.settings_page, name="web-settings"),
    path("projects/<int:project_id>/", views.project_page, name="web-dashboard"),
    path("projects/<int:project_id>/queue/", views.project_page, {"page": "queue"}, name="web-queue"),
    path("projects/<int:project_id>/tiles/<int:tile_id>/", views.workspace_page, name="web-workspace"),
    path("projects/<int:project_id>/images/", views.project_page, {"page": "images"}, name="web-images"),
    path("projects/<int:project_id>/images/<int:image_id>/", views.slide_page, name="web-slide"),
    path("projects/<int:project_id>/upload/", views.upload_page, name="web-upload"),
    path("projects/<int:project_id>/review/", views.review_page, name="web-review"),
    path("projects/<int:project_id>/review/<int:annotation_id>/", views.review_page, name="web-review-detail"),
    path("projects/<int:project_id>/training/", views.project_page, {"page": "training"}, name="web-training"),
    path("projects/<int:project_id>/models/", views.project_page, {"page": "models"}, name="web-models"),
    path("projects/<int:project_id>/exports/", views.project_page, {"page": "exports"}, name="web-exports"),
    # API for the pages (role-checked; listed in tests/backend/test_permissions.py's MATRIX).
    path("api/tiles/<int:tile_id>/regions/", api.TileRegionsView.as_view(), name="tile-regions"),
    path("api/tiles/<int:tile_id>/prediction.png", api.TilePredictionOverlayView.as_view(), name="tile-prediction-overlay"),
    path("api/tiles/<int:tile_id>/uncertainty.png", api.TileUncertaintyView.as_view(), name="tile-uncertainty"),
    path("api/tiles/<int:tile_id>/context.png", api.TileContextView.as_view(), name="tile-context"),
    path("api/annotations/<int:annotation_id>/diff/", api.AnnotationDiffView.as_view(), name="annotation-diff"),
    path("api/annotations/<int:annotation_id>/diff.png", api.AnnotationDiffImageView.as_view(), name="annotation-diff-image"),
    path("api/projects/<int:project_id>/summary/", api.ProjectSummaryView.as_view(), name="project-summary"),
    path("api/projects/<int:project_id>/tiles-by-image/", api.ImageTilesView.as_view(), name="project-image-tiles"),
    path("api/projects/<int:project_id>/review/", api.ReviewListView.as_view(), name="review-list"),
    path("api/system/status/", api.SystemStatusView.as_view(), name="system-status"),
    path("api/images/<int:image_id>/tiles/", slides.SlideTilesView.as_view(), name="slide-tiles"),
    path("api/images/<int:image_id>/nuclei/", slides.SlideNucleiView.as_view(), name="slide-nuclei"),
]
