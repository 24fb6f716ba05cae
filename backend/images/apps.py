from django.apps import AppConfig


class ImagesConfig(AppConfig):
    name = "backend.images"
    label = "images"

    def ready(self) -> None:
        from . import tasks  # noqa: F401  (registers the ingest task in every process)
