"""A small wrapper around label-studio-sdk 2.x: the calls Karyo makes, with one error type.

The SDK is imported lazily (it takes seconds to import), so Django starts as fast without it.
Every failure becomes :class:`LabelStudioError`; ``unavailable`` tells "the server did not
answer" (retry later, nothing is lost) from "the server refused" (a bug or a configuration).
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, Iterator

from django.conf import settings

UNCERTAINTY_SAMPLING = "Uncertainty sampling"
TITLE_MAX = 50  # Label Studio's project title limit


class LabelStudioError(Exception):
    def __init__(self, message: str, *, unavailable: bool = False, status_code: int | None = None):
        super().__init__(message)
        self.unavailable = unavailable
        self.status_code = status_code


class NotConfigured(LabelStudioError):
    pass


@dataclass(frozen=True)
class LSTask:
    id: int
    data: dict
    updated_at: dt.datetime | None


@dataclass(frozen=True)
class LSAnnotation:
    id: int
    task: int
    result: list
    completed_by: int | None
    parent_prediction: int | None
    was_cancelled: bool
    updated_at: dt.datetime | None


def is_configured() -> bool:
    return bool(settings.LABEL_STUDIO_URL and settings.LABEL_STUDIO_TOKEN)


def _dt(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _annotation(raw) -> LSAnnotation:
    get = raw.get if isinstance(raw, dict) else lambda k, d=None: getattr(raw, k, d)
    return LSAnnotation(
        id=int(get("id")), task=int(get("task")), result=list(get("result") or []),
        completed_by=get("completed_by"), parent_prediction=get("parent_prediction"),
        was_cancelled=bool(get("was_cancelled", False)), updated_at=_dt(get("updated_at")),
    )


class LabelStudioClient:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0):
        url, token = url or settings.LABEL_STUDIO_URL, token or settings.LABEL_STUDIO_TOKEN
        if not (url and token):
            raise NotConfigured("Label Studio is not configured (set LABEL_STUDIO_URL and LABEL_STUDIO_TOKEN)")
        from label_studio_sdk.client import LabelStudio

        self.url = url.rstrip("/")
        self.sdk = LabelStudio(base_url=self.url, api_key=token, timeout=timeout)

    # --- plumbing ------------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        try:
            return fn(*args, **kwargs)
        except ApiError as exc:
            body = exc.body if isinstance(exc.body, (str, dict, list)) else repr(exc.body)
            raise LabelStudioError(
                f"Label Studio refused to {what}: HTTP {exc.status_code} {json.dumps(body)[:500]}",
                status_code=exc.status_code, unavailable=(exc.status_code or 0) >= 502,
            ) from None
        except httpx.HTTPError as exc:
            raise LabelStudioError(f"Label Studio at {self.url} is unreachable ({what}): {exc}", unavailable=True) from None

    def _raw(self, method: str, path: str, **kwargs) -> Any:
        """Endpoints the SDK does not wrap (Label Studio's own API, same authentication)."""
        wrapper = self.sdk._client_wrapper
        response = self._call(
            f"{method} {path}", wrapper.httpx_client.request, path, method=method, **kwargs
        )
        if response.status_code >= 400:
            raise LabelStudioError(
                f"Label Studio refused {method} {path}: HTTP {response.status_code} {response.text[:500]}",
                status_code=response.status_code, unavailable=response.status_code >= 502,
            )
        return response.json() if response.content else None

    # --- projects -------------------------------------------------------------------------------
    def create_project(self, *, title: str, description: str, label_config: str) -> int:
        project = self._call(
            "create a project", self.sdk.projects.create, title=title[:TITLE_MAX], description=description,
            label_config=label_config, show_collab_predictions=True, sampling=UNCERTAINTY_SAMPLING,
            maximum_annotations=1, show_skip_button=True, enable_empty_annotation=True,
        )
        return int(project.id)

    def project_exists(self, project_id: int) -> bool:
        try:
            self._call("read a project", self.sdk.projects.get, id=project_id)
        except LabelStudioError as exc:
            if exc.status_code == 404:
                return False
            raise
        return True

    def update_project(self, project_id: int, **fields) -> None:
        self._call("update a project", self.sdk.projects.update, id=project_id, **fields)

    def next_task_id(self, project_id: int) -> int | None:
        """The task Label Studio's labeling stream opens next (uncertainty sampling)."""
        body = self._raw("GET", f"api/projects/{project_id}/next")
        return int(body["id"]) if body and body.get("id") else None

    # --- tasks ---------------------------------------------------------------------------------
    def import_tasks(self, project_id: int, tasks: list[dict]) -> list[int]:
        response = self._call(
            "import tasks", self.sdk.projects.import_tasks, id=project_id, request=tasks, return_task_ids=True
        )
        return [int(i) for i in (response.task_ids or [])]

    def list_tasks(self, project_id: int, *, updated_after: dt.datetime | None = None) -> Iterator[LSTask]:
        kwargs: dict[str, Any] = {"project": project_id, "fields": "task_only", "page_size": 500}
        if updated_after is not None:
            value = updated_after.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            kwargs["query"] = json.dumps({"filters": {"conjunction": "and", "items": [
                {"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime", "value": value}
            ]}})
        # Page by page, stopping at the total Label Studio reports: the SDK's pager asks for one
        # page past the last, which Label Studio answers with 404 "Invalid page" and a traceback
        # in its console for every reconcile (issue 14, rough edge 9).
        page, seen = 1, 0
        while True:
            pager = self._call("list tasks", self.sdk.tasks.list, page=page, **kwargs)
            items = list(pager.items or [])
            for task in items:
                yield LSTask(id=int(task.id), data=dict(task.data or {}), updated_at=_dt(task.updated_at))
            seen += len(items)
            total = getattr(pager.response, "total", None)
            if len(items) < kwargs["page_size"] or (total is not None and seen >= total):
                return
            page += 1

    def update_task_data(self, task_id: int, data: dict) -> None:
        self._call("update a task", self.sdk.tasks.update, id=str(task_id), data=data)

    # --- predictions ---------------------------------------------------------------------------
    def create_prediction(self, *, task_id: int, result: list, score: float, model_version: str) -> int:
        prediction = self._call(
            "create a prediction", self.sdk.predictions.create, task=task_id, result=result, score=score,
            model_version=model_version,
        )
        return int(prediction.id)

    def update_prediction_score(self, prediction_id: int, score: float) -> None:
        self._call("update a prediction", self.sdk.predictions.update, id=prediction_id, score=score)

    def delete_prediction(self, prediction_id: int) -> None:
        try:
            self._call("delete a prediction", self.sdk.predictions.delete, id=prediction_id)
        except LabelStudioError as exc:
            if exc.status_code != 404:
                raise

    def list_predictions(self, *, task_id: int) -> list:
        return list(self._call("list predictions", self.sdk.predictions.list, task=task_id))

    # --- annotations ---------------------------------------------------------------------------
    def get_annotation(self, annotation_id: int) -> LSAnnotation | None:
        try:
            return _annotation(self._call("read an annotation", self.sdk.annotations.get, id=annotation_id))
        except LabelStudioError as exc:
            if exc.status_code == 404:
                return None
            raise

    def list_annotations(self, task_id: int) -> list[LSAnnotation]:
        return [_annotation(a) for a in self._call("list annotations", self.sdk.annotations.list, id=task_id)]

    # --- users ---------------------------------------------------------------------------------
    def ensure_user(self, *, username: str, email: str, first_name: str = "") -> int:
        """The id of the organisation's Label Studio user ``username`` (or, failing that, with
        ``email``: e-mails are unique there), created when missing (Label Studio adds users created
        through its API to the caller's organisation)."""
        users = list(self._call("list users", self.sdk.users.list) or [])
        for user in users:
            if user.username == username:
                return int(user.id)
        for user in users:
            if email and (user.email or "").lower() == email.lower():
                return int(user.id)
        created = self._call("create a user", self.sdk.users.create, username=username, email=email,
                             first_name=first_name or username)
        return int(created.id)

    def create_annotation(self, *, task_id: int, result: list, completed_by: int | None) -> LSAnnotation:
        kwargs = {"completed_by": completed_by} if completed_by else {}
        created = self._call("create an annotation", self.sdk.annotations.create, id=task_id, result=result, **kwargs)
        return _annotation(created)

    def update_annotation(self, *, annotation_id: int, result: list) -> LSAnnotation:
        return _annotation(self._call("update an annotation", self.sdk.annotations.update, id=annotation_id,
                                      result=result))

    def user_email(self, user_id: int) -> str | None:
        try:
            return self._call("read a user", self.sdk.users.get, id=user_id).email
        except LabelStudioError as exc:
            if exc.status_code in (403, 404):
                return None
            raise

    # --- webhooks and ML backends --------------------------------------------------------------
    def ensure_webhook(self, *, webhook_id: int | None, project_id: int, url: str, headers: dict, actions: list[str]) -> int:
        if webhook_id is not None:
            try:
                hook = self._call("read a webhook", self.sdk.webhooks.get, id=webhook_id)
                if hook.url == url and (hook.headers or {}) == headers and hook.is_active and hook.project == project_id:
                    return webhook_id
                self._call(
                    "update a webhook", self.sdk.webhooks.update, id=webhook_id, url=url, headers=headers,
                    actions=actions, is_active=True, send_payload=True, send_for_all_actions=False,
                )
                return webhook_id
            except LabelStudioError as exc:
                if exc.status_code != 404:
                    raise
        hook = self._call(
            "create a webhook", self.sdk.webhooks.create, url=url, project=project_id, headers=headers, actions=actions,
            is_active=True, send_payload=True, send_for_all_actions=False,
        )
        return int(hook.id)

    def delete_webhooks_to(self, *, project_id: int, url: str) -> int:
        """Remove the project's webhooks that post to ``url``; returns how many."""
        hooks = self._call("list webhooks", self.sdk.webhooks.list, project=str(project_id))
        removed = 0
        for hook in hooks or []:
            if hook.url == url and hook.project == project_id:
                self._call("delete a webhook", self.sdk.webhooks.delete, id=hook.id)
                removed += 1
        return removed

    def set_webhook_active(self, webhook_id: int, active: bool) -> None:
        self._call("update a webhook", self.sdk.webhooks.update, id=webhook_id, is_active=active)

    def ensure_ml_backend(self, *, ml_backend_id: int | None, project_id: int, url: str, secret: str) -> int:
        if ml_backend_id is not None:
            try:
                backend = self._call("read an ML backend", self.sdk.ml.get, id=ml_backend_id)
                if backend.url == url and backend.project == project_id:
                    return ml_backend_id
            except LabelStudioError as exc:
                if exc.status_code != 404:
                    raise
        backend = self._call(
            "connect Karyo as an ML backend", self.sdk.ml.create, project=project_id, url=url, title="Karyo",
            description="Karyo's active-learning models: stored predictions, training on demand",
            auth_method="BASIC_AUTH", basic_auth_user="karyo", basic_auth_pass=secret, is_interactive=False,
        )
        return int(backend.id)

    def train(self, ml_backend_id: int) -> None:
        self._call("start training", self.sdk.ml.train, id=ml_backend_id)
