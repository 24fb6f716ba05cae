from django.apps import AppConfig


class MlConfig(AppConfig):
    name = "backend.ml"
    label = "ml"

    def ready(self) -> None:
        from backend.images.signals import annotation_saved

        from . import receivers, tasks  # noqa: F401  (tasks: registers the Celery tasks in every process)

        annotation_saved.connect(receivers.on_annotation_saved, dispatch_uid="ml.on_annotation_saved")
