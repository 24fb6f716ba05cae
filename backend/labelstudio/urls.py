from django.urls import path

from . import api

urlpatterns = [
    path("api/projects/<int:project_id>/labelstudio/", api.SyncStatusView.as_view(), name="labelstudio-status"),
    path("api/labelstudio/webhook", api.WebhookView.as_view(), name="labelstudio-webhook"),
    # Label Studio's ML-backend protocol: it appends these names to the URL it was given.
    path("api/labelstudio/ml/health", api.MLHealthView.as_view(), name="labelstudio-ml-health"),
    path("api/labelstudio/ml/setup", api.MLSetupView.as_view(), name="labelstudio-ml-setup"),
    path("api/labelstudio/ml/versions", api.MLVersionsView.as_view(), name="labelstudio-ml-versions"),
    path("api/labelstudio/ml/predict", api.MLPredictView.as_view(), name="labelstudio-ml-predict"),
    path("api/labelstudio/ml/webhook", api.MLWebhookView.as_view(), name="labelstudio-ml-webhook"),
    path("labelstudio/tiles/<str:token>.png", api.signed_tile_image, name="labelstudio-tile-image"),
]
