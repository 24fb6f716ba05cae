from django.apps import AppConfig


class LabelStudioConfig(AppConfig):
    name = "backend.labelstudio"
    label = "labelstudio"
    verbose_name = "Label Studio integration"
