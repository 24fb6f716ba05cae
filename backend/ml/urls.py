from django.urls import path

from . import api

urlpatterns = [
    path("projects/<int:project_id>/model-versions/", api.ModelVersionListView.as_view(), name="model-version-list"),
    path("projects/<int:project_id>/training-runs/", api.TrainingRunListView.as_view(), name="training-run-list"),
]
