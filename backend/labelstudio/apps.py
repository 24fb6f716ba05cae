from django.apps import AppConfig


class LabelStudioConfig(AppConfig):
    name = "backend.labelstudio"
    label = "labelstudio"
    verbose_name = "Label Studio integration"

    def ready(self) -> None:
        from backend.ml.signals import queue_ranked

        from . import receivers, tasks  # noqa: F401  (tasks: registers the Celery tasks in every process)

        queue_ranked.connect(receivers.on_queue_ranked, dispatch_uid="labelstudio.on_queue_ranked")
        from backend.images.signals import annotation_saved

        annotation_saved.connect(receivers.on_annotation_saved, dispatch_uid="labelstudio.on_annotation_saved")
        from backend.projects.signals import members_changed

        members_changed.connect(receivers.on_members_changed, dispatch_uid="labelstudio.on_members_changed")
