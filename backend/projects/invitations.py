"""Inviting people into a project by username or e-mail.

An invitee without an account gets one with no usable password and a one-time set-password
link made with Django's password-reset token machinery: the token hashes the account's
password and last login, so it stops working once the password is set (or after
``PASSWORD_RESET_TIMEOUT``). With an SMTP server configured (``KARYO_EMAIL_HOST``) the link is
e-mailed; without one (the embedded default) it is logged and returned to the inviting admin,
who passes it on.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.tokens import default_token_generator
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import transaction
from django.urls import reverse
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from backend.common.errors import Conflict, KaryoError

from .models import Membership, Project, Role
from .services import announce_members_changed

logger = logging.getLogger(__name__)
USERNAME_RE = re.compile(r"^[\w.@+-]{1,150}$")


@dataclass
class Invitation:
    membership: Membership
    account_created: bool
    set_password_url: str | None  # None when the account already has a password
    emailed: bool


def set_password_url(*, user) -> str:
    path = reverse("set-password", kwargs={"uidb64": urlsafe_base64_encode(force_bytes(user.pk)),
                                           "token": default_token_generator.make_token(user)})
    return settings.KARYO_PUBLIC_URL.rstrip("/") + path


def _find_or_create_user(*, username: str, email: str):
    User = get_user_model()
    if email:
        try:
            validate_email(email)
        except ValidationError:
            raise KaryoError(f"{email!r} is not an e-mail address", code="invalid_email") from None
    if username and not USERNAME_RE.match(username):
        raise KaryoError("usernames use letters, digits and @ . + - _ only (at most 150)", code="invalid_username")
    user = None
    if username:
        user = User.objects.filter(username=username).first()
    if user is None and email:
        user = User.objects.filter(email__iexact=email).order_by("pk").first()
    if user is not None:
        return user, False
    if not username:
        username = _free_username(email.split("@")[0])
    user = User(username=username, email=email)
    user.set_unusable_password()
    user.save()
    return user, True


def _free_username(base: str) -> str:
    base = re.sub(r"[^\w.@+-]", "", base)[:140] or "user"
    User = get_user_model()
    candidate, n = base, 1
    while User.objects.filter(username=candidate).exists():
        n += 1
        candidate = f"{base}{n}"
    return candidate


def invite_member(*, project: Project, username: str = "", email: str = "", role: str, invited_by) -> Invitation:
    """Add the account named by ``username`` or ``email`` to ``project``, creating it when needed."""
    username, email = (username or "").strip(), (email or "").strip()
    if not username and not email:
        raise KaryoError("give a username or an e-mail address", code="invalid_invitation")
    if role not in Role.values:
        raise KaryoError(f"unknown role {role!r}; use one of {', '.join(Role.values)}", code="invalid_role")
    with transaction.atomic():
        user, created = _find_or_create_user(username=username, email=email)
        membership, added = Membership.objects.get_or_create(user=user, project=project, defaults={"role": role})
        if not added:
            raise Conflict(f"{user.username} is already a member of {project.name}")
        announce_members_changed(project=project)
    link = None if user.has_usable_password() else set_password_url(user=user)
    emailed = False
    if link and user.email and settings.KARYO_EMAIL_CONFIGURED:
        inviter = getattr(invited_by, "username", "An administrator")
        send_mail(
            subject=f"You are invited to {project.name} on Karyo",
            message=(f"{inviter} added you to the Karyo project {project.name!r} as {role}.\n\n"
                     f"Your username is {user.username}. Choose a password here (the link works once):\n{link}\n"),
            from_email=None, recipient_list=[user.email],
        )
        emailed = True
    elif link:
        logger.warning("set-password link for %s (invited to %s as %s): %s", user.username, project.name, role, link)
    return Invitation(membership=membership, account_created=created, set_password_url=None if emailed else link,
                      emailed=emailed)
