from __future__ import annotations

from rest_framework import serializers

from .models import Membership, Project, Role, validate_nucleus_classes


class ProjectSerializer(serializers.ModelSerializer):
    my_role = serializers.SerializerMethodField()
    image_count = serializers.IntegerField(read_only=True, required=False)
    tile_count = serializers.IntegerField(read_only=True, required=False)

    class Meta:
        model = Project
        fields = [
            "id", "name", "description", "nucleus_classes", "tile_size", "tile_overlap", "stain_normalization",
            "auto_retrain_threshold", "default_architecture", "al_strategy", "require_review", "licence",
            "created_at", "my_role", "image_count", "tile_count",
        ]
        read_only_fields = ["id", "created_at", "my_role", "image_count", "tile_count"]

    def get_my_role(self, project: Project) -> str | None:
        from .selectors import role_of

        request = self.context.get("request")
        role = role_of(user=request.user, project=project) if request else None
        return role.value if role else None

    def validate_nucleus_classes(self, value):
        from django.core.exceptions import ValidationError as DjangoValidationError

        try:
            validate_nucleus_classes(value)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from None
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
        return attrs


class MembershipSerializer(serializers.ModelSerializer):
    username = serializers.CharField(source="user.username")
    email = serializers.EmailField(source="user.email", read_only=True)
    role = serializers.ChoiceField(choices=Role.choices)

    class Meta:
        model = Membership
        fields = ["id", "username", "email", "role", "created_at"]
        read_only_fields = ["id", "email", "created_at"]


class RoleSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=Role.choices)
