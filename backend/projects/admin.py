from django.contrib import admin

from backend.common.admin import ReadOnlyAdmin

from .models import Membership, Project


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    readonly_fields = ["user", "role", "created_at"]
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Project)
class ProjectAdmin(ReadOnlyAdmin):
    list_display = ["name", "default_architecture", "al_strategy", "tile_size", "archived_at", "created_by", "created_at"]
    list_filter = ["default_architecture", "al_strategy", "archived_at"]
    search_fields = ["name", "description"]
    editable = ("description", "licence", "archived_at")
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(ReadOnlyAdmin):
    list_display = ["user", "project", "role", "created_at"]
    list_filter = ["role", "project"]
    search_fields = ["user__username", "user__email", "project__name"]
    editable = ("role",)
