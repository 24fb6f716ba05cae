from django.apps import AppConfig


class ImagesConfig(AppConfig):
    name = "backend.images"
    label = "images"

    def ready(self) -> None:
        from . import tasks  # noqa: F401  (registers the ingest task in every process)
        from backend.projects.signals import class_usage

        from .receivers import classes_used_by_annotations, on_annotation_saved
        from .signals import annotation_saved

        class_usage.connect(classes_used_by_annotations, dispatch_uid="images.classes_used_by_annotations")
        annotation_saved.connect(on_annotation_saved, dispatch_uid="images.stitch_on_annotation_saved")
