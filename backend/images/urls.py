from django.urls import path

from . import api

urlpatterns = [
    path("projects/<int:project_id>/images/", api.ImageListView.as_view(), name="image-list"),
    path("images/<int:image_id>/", api.ImageDetailView.as_view(), name="image-detail"),
    path("projects/<int:project_id>/tiles/", api.TileListView.as_view(), name="tile-list"),
    path("tiles/<int:tile_id>/", api.TileDetailView.as_view(), name="tile-detail"),
    path("tiles/<int:tile_id>/image.png", api.TileImageView.as_view(), name="tile-image"),
    path("tiles/<int:tile_id>/overlay.png", api.TileOverlayView.as_view(), name="tile-overlay"),
    path("tiles/<int:tile_id>/annotations/", api.AnnotationListView.as_view(), name="annotation-list"),
    path("annotations/<int:annotation_id>/", api.AnnotationDetailView.as_view(), name="annotation-detail"),
    path("annotations/<int:annotation_id>/mask.png", api.AnnotationMaskView.as_view(), name="annotation-mask"),
    path("annotations/<int:annotation_id>/review/", api.AnnotationReviewView.as_view(), name="annotation-review"),
]
