from django.apps import AppConfig


class ExportsConfig(AppConfig):
    name = "backend.exports"
    label = "exports"

    def ready(self) -> None:
        from . import tasks  # noqa: F401  (registers the Celery tasks in every process)
