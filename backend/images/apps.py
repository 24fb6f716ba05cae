from django.apps import AppConfig


class ImagesConfig(AppConfig):
    name = "backend.images"
    label = "images"

    def ready(self) -> None:
        from . import tasks  # noqa: F401  (registers the ingest task in every process)
        from backend.projects.signals import class_usage

        from .receivers import classes_used_by_annotations

        class_usage.connect(classes_used_by_annotations, dispatch_uid="images.classes_used_by_annotations")
