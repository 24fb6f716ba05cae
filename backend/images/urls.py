from django.urls import path

from . import api, slide_api

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
    # Big uploads and slide pixels (issue 11).
    path("projects/<int:project_id>/uploads/", slide_api.UploadCreateView.as_view(), name="upload-create"),
    path("uploads/<uuid:upload_id>/", slide_api.UploadDetailView.as_view(), name="upload-detail"),
    path("uploads/<uuid:upload_id>/chunks/<int:n>/", slide_api.UploadChunkView.as_view(), name="upload-chunk"),
    path("uploads/<uuid:upload_id>/parts/", slide_api.UploadPartUrlsView.as_view(), name="upload-parts"),
    path("uploads/<uuid:upload_id>/complete/", slide_api.UploadCompleteView.as_view(), name="upload-complete"),
    path("images/<int:image_id>/slide.dzi", slide_api.SlideDziView.as_view(), name="slide-dzi"),
    path("images/<int:image_id>/slide_files/<int:level>/<int:col>_<int:row>.jpeg", slide_api.SlideTileView.as_view(),
         name="slide-tile"),
    path("images/<int:image_id>/thumbnail.jpeg", slide_api.ThumbnailView.as_view(), name="image-thumbnail"),
]
