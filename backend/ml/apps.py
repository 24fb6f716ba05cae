from django.apps import AppConfig


class MlConfig(AppConfig):
    name = "backend.ml"
    label = "ml"
