from django.urls import path

from . import api

urlpatterns = [
    path("projects/<int:project_id>/model-versions/", api.ModelVersionListView.as_view(), name="model-version-list"),
    path("projects/<int:project_id>/model-versions/rollback/", api.RollbackView.as_view(), name="model-version-rollback"),
    path("model-versions/<int:model_version_id>/promote/", api.PromoteView.as_view(), name="model-version-promote"),
    path("projects/<int:project_id>/training-runs/", api.TrainingRunListView.as_view(), name="training-run-list"),
    path("training-runs/<int:run_id>/", api.TrainingRunDetailView.as_view(), name="training-run-detail"),
    path("training-runs/<int:run_id>/cancel/", api.TrainingRunCancelView.as_view(), name="training-run-cancel"),
    path("projects/<int:project_id>/pretrainings/", api.PretrainingListView.as_view(), name="pretraining-list"),
    path("pretrainings/<int:pretraining_id>/cancel/", api.PretrainingCancelView.as_view(), name="pretraining-cancel"),
    path("projects/<int:project_id>/queue/", api.QueueView.as_view(), name="queue"),
    path("projects/<int:project_id>/queue/next/", api.QueueNextView.as_view(), name="queue-next"),
    path("projects/<int:project_id>/queue/release/", api.QueueReleaseView.as_view(), name="queue-release"),
    path("projects/<int:project_id>/rank/", api.RankView.as_view(), name="queue-rank"),
    path("projects/<int:project_id>/events/", api.EventListView.as_view(), name="event-list"),
    path("catalog/", api.CatalogView.as_view(), name="catalog"),
]
