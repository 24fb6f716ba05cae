from django.apps import AppConfig


class ImagesConfig(AppConfig):
    name = "backend.images"
    label = "images"
