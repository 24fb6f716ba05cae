from __future__ import annotations

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the admin account once (KARYO_ADMIN_USERNAME / KARYO_ADMIN_PASSWORD, or a generated password)."

    def handle(self, *args, **options):
        username = os.environ.get("KARYO_ADMIN_USERNAME", "admin")
        User = get_user_model()
        if User.objects.filter(username=username).exists():
            self.stdout.write(f"admin account: {username} (exists; `python manage.py changepassword {username}` to reset)")
            return
        password = os.environ.get("KARYO_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email=f"{username}@karyo.local", password=password)
        shown = "(from KARYO_ADMIN_PASSWORD)" if os.environ.get("KARYO_ADMIN_PASSWORD") else password
        self.stdout.write(self.style.SUCCESS(f"created admin account: {username} / {shown}  <- shown once, write it down"))
