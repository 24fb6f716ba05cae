from __future__ import annotations

from rest_framework import serializers

from ml_worker import catalog

from .models import Membership, Project, Role, engine_setting_errors, validate_nucleus_classes


class ProjectSerializer(serializers.ModelSerializer):
    my_role = serializers.SerializerMethodField()
    # Always present (the schema says so): the list annotates them, a single project counts here.
    image_count = serializers.SerializerMethodField()
    tile_count = serializers.SerializerMethodField()
    # Declared so the model's validator (which needs ids) runs after Karyo has assigned them.
    nucleus_classes = serializers.JSONField(required=False, help_text='[{"name", "color": "#rrggbb", "id" (kept on edits)}]')

    def get_image_count(self, project) -> int:
        counted = getattr(project, "image_count", None)
        return counted if counted is not None else project.images.count()

    def get_tile_count(self, project) -> int:
        counted = getattr(project, "tile_count", None)
        return counted if counted is not None else project.tiles.count()

    class Meta:
        model = Project
        fields = [
            "id", "name", "description", "nucleus_classes", "tile_size", "tile_overlap", "stain_normalization",
            "auto_retrain_threshold", "default_architecture", "al_strategy", "ssl_pretrain", "require_review", "licence",
            "context_margin", "working_mpp", "min_tissue_fraction", "archived_at", "training_defaults",
            "created_at", "my_role", "image_count", "tile_count",
        ]
        read_only_fields = ["id", "created_at", "my_role", "image_count", "tile_count", "archived_at"]
        extra_kwargs = {
            "stain_normalization": {"error_messages": {"invalid_choice": (
                f'unknown stain normaliser "{{input}}"; valid: {", ".join(catalog.stain_normalizer_names())}')}},
            "default_architecture": {"help_text": f"one of: {', '.join(catalog.architecture_names())}"},
            "al_strategy": {"help_text": f"one of: {', '.join(catalog.strategy_names())}"},
            "training_defaults": {"help_text": "training options every run of the project starts from "
                                               "(GET /api/catalog/ lists them with their bounds)"},
        }

    def get_my_role(self, project: Project) -> str | None:
        from .selectors import role_of

        request = self.context.get("request")
        role = role_of(user=request.user, project=project) if request else None
        return role.value if role else None

    def validate_nucleus_classes(self, value):
        """Callers give names and colours; Karyo assigns the ids (an edit keeps the ids it sends
        back for existing classes, so stored label maps keep their meaning)."""
        from django.core.exceptions import ValidationError as DjangoValidationError

        from .services import assign_class_ids, removed_classes_in_use

        if not isinstance(value, list) or not value:
            raise serializers.ValidationError("give at least one nucleus class")
        for item in value:
            if not isinstance(item, dict) or not str(item.get("name", "")).strip() or "color" not in item:
                raise serializers.ValidationError("each nucleus class needs a name and a colour (#rrggbb)")
            # Text, not whatever str() makes of a list or a number.
            if not isinstance(item["name"], str) or len(item["name"]) > 64 or not isinstance(item["color"], str):
                raise serializers.ValidationError("a nucleus class name is text of at most 64 characters and its "
                                                  "colour a #rrggbb string")
            if "id" in item and (isinstance(item["id"], bool) or not isinstance(item["id"], int)):
                raise serializers.ValidationError("a nucleus class id is an integer (Karyo assigns new ones)")
        cleaned = [{**item, "name": str(item["name"]).strip(), "color": str(item["color"]).lower()} for item in value]
        previous = self.instance.nucleus_classes if self.instance is not None else []
        classes = assign_class_ids(classes=cleaned, previous=previous)
        try:
            validate_nucleus_classes(classes)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from None
        if self.instance is not None:
            in_use = removed_classes_in_use(project=self.instance, classes=classes)
            if in_use:
                raise serializers.ValidationError(
                    f"annotations use {', '.join(in_use)}: a class in use cannot be removed (rename it instead)")
        return classes

    def validate_working_mpp(self, value):
        if not 0.05 <= value <= 20:
            raise serializers.ValidationError("working resolution must be between 0.05 and 20 microns per pixel")
        return value

    def validate_context_margin(self, value):
        if value > 1024:
            raise serializers.ValidationError("context margin must be between 0 and 1024 pixels")
        return value

    def validate_min_tissue_fraction(self, value):
        if not 0 <= value <= 1:
            raise serializers.ValidationError("minimum tissue fraction must be between 0 and 1")
        return value

    def validate(self, attrs):
        tile_size = attrs.get("tile_size", getattr(self.instance, "tile_size", 256))
        overlap = attrs.get("tile_overlap", getattr(self.instance, "tile_overlap", 0))
        if not 32 <= tile_size <= 4096:
            raise serializers.ValidationError({"tile_size": "tile size must be between 32 and 4096 pixels"})
        if overlap >= tile_size:
            raise serializers.ValidationError({"tile_overlap": "overlap must be smaller than the tile size"})
        if self.instance is not None and self.instance.tiles.exists() and (
            tile_size != self.instance.tile_size or overlap != self.instance.tile_overlap
        ):
            raise serializers.ValidationError({"tile_size": "tiling cannot change once images are uploaded"})
        return self._validate_engine_settings(attrs)

    def _validate_engine_settings(self, attrs):
        """Architecture, strategy, stain normaliser and training defaults must be the engine
        catalog's (a 400 naming the valid values); the defaults must also fit the architecture."""
        fields = {name: attrs[name] for name in ("default_architecture", "al_strategy", "stain_normalization")
                  if name in attrs}
        if "training_defaults" in attrs or "default_architecture" in attrs:
            fields["training_defaults"] = attrs.get("training_defaults", getattr(self.instance, "training_defaults", {}))
            fields.setdefault("default_architecture",
                              getattr(self.instance, "default_architecture", catalog.DEFAULT_ARCHITECTURE))
        errors = engine_setting_errors(**fields)
        if errors:
            raise serializers.ValidationError(errors)
        if "training_defaults" in attrs:
            attrs["training_defaults"] = catalog.validate_training_options(attrs["training_defaults"])
        return attrs


class MembershipSerializer(serializers.ModelSerializer):
    username = serializers.CharField(source="user.username")
    email = serializers.CharField(source="user.email", read_only=True)  # blank for accounts invited by username
    role = serializers.ChoiceField(choices=Role.choices)

    class Meta:
        model = Membership
        fields = ["id", "username", "email", "role", "created_at"]
        read_only_fields = ["id", "email", "created_at"]


class InvitationSerializer(serializers.Serializer):
    username = serializers.CharField(required=False, allow_blank=True, max_length=150)
    email = serializers.CharField(required=False, allow_blank=True, max_length=254)
    role = serializers.ChoiceField(choices=Role.choices)

    def validate(self, attrs):
        if not (attrs.get("username") or "").strip() and not (attrs.get("email") or "").strip():
            raise serializers.ValidationError({"username": "give a username or an e-mail address"})
        return attrs


class InvitationResultSerializer(MembershipSerializer):
    account_created = serializers.BooleanField(read_only=True)
    emailed = serializers.BooleanField(read_only=True)
    set_password_url = serializers.CharField(read_only=True, allow_null=True,
                                             help_text="one-time link for the new member, when it was not e-mailed")

    class Meta(MembershipSerializer.Meta):
        fields = MembershipSerializer.Meta.fields + ["account_created", "emailed", "set_password_url"]


class RoleSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=Role.choices)
