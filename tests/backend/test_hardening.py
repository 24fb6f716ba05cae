"""Hardening (issue 13): limits, the JSON error shape everywhere under /api/, login throttling.
Each test is named for the behaviour it pins; the issue's Why list maps onto them."""
from __future__ import annotations

import json

import pytest
from rest_framework.test import APIClient


pytestmark = pytest.mark.django_db


def assert_error_shape(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = json.loads(response.content)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert "Traceback" not in response.content.decode() and "/work/" not in response.content.decode()
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


NESTED = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_on_the_login_endpoint_without_credentials_is_a_400_not_a_recursion_error():
    response = APIClient().post("/api/auth/token/", NESTED, content_type="application/json")
    error = assert_error_shape(response, 400, "parse_error")
    assert "nested" in error["message"]


def test_deeply_nested_json_on_an_authenticated_endpoint_is_a_400(api, team):
    response = api("admin").post(f"/api/projects/{team['project'].pk}/training-runs/", '{"config": ' + NESTED + "}",
                                 content_type="application/json")
    assert_error_shape(response, 400, "parse_error")


def test_json_nested_within_the_limit_is_parsed_normally(api):
    response = APIClient().post("/api/auth/token/", json.dumps({"username": [[["x"]]], "password": "p"}),
                                content_type="application/json")
    error = assert_error_shape(response, 400, "validation_error")
    assert "username" in error["message"]


def test_a_json_body_over_the_size_limit_is_refused_with_413_before_it_is_read(api, team, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2_000
    body = json.dumps({"config": {"epochs": 1}, "padding": "x" * 5_000})
    response = api("admin").post(f"/api/projects/{team['project'].pk}/training-runs/", body,
                                 content_type="application/json")
    error = assert_error_shape(response, 413, "request_too_large")
    assert error["details"] == {"limit": 2_000}


def test_an_upload_over_the_upload_limit_is_refused_with_413(api, team, settings):
    from django.core.files.uploadedfile import SimpleUploadedFile

    settings.KARYO_MAX_UPLOAD_BYTES = 1_000
    response = api("admin").post(f"/api/projects/{team['project'].pk}/images/",
                                 {"file": SimpleUploadedFile("big.png", b"\x89PNG" + b"0" * 3_000_000)},
                                 format="multipart")
    assert_error_shape(response, 413, "request_too_large")


def test_an_unknown_api_url_is_a_json_404(api):
    assert_error_shape(api("admin").get("/api/no-such-thing/"), 404, "not_found")


def test_a_wrong_method_is_a_json_405(api):
    response = api("admin").delete("/api/auth/token/")
    assert_error_shape(response, 405)


def test_an_unexpected_error_is_a_json_500_without_a_traceback(api, team, monkeypatch):
    from backend.projects import api as projects_api

    def broken(*args, **kwargs):
        raise RuntimeError("/srv/secret/path exploded")

    monkeypatch.setattr(projects_api.ProjectDetailView, "get_object", broken)
    client = api("admin")
    client.raise_request_exception = False
    response = client.get(f"/api/projects/{team['project'].pk}/")
    error = assert_error_shape(response, 500, "server_error")
    assert "secret" not in error["message"]


def test_a_django_level_500_under_api_is_json_too(rf):
    # An exception outside DRF (another middleware, a plain Django view): Django renders its own
    # HTML 500 page, which the outermost middleware replaces with the JSON shape.
    from django.core.handlers.exception import convert_exception_to_response

    from backend.common.middleware import ApiErrorMiddleware

    def broken_view(request):
        raise RuntimeError("/srv/secret exploded")

    middleware = ApiErrorMiddleware(convert_exception_to_response(broken_view))
    response = middleware(rf.get("/api/anything/"))
    error = assert_error_shape(response, 500, "server_error")
    assert "secret" not in error["message"]
    page = middleware(rf.get("/projects/"))  # outside /api/: Django's own page stays
    assert page.status_code == 500 and not page["Content-Type"].startswith("application/json")


def test_login_is_throttled_after_repeated_wrong_passwords_even_for_the_right_one_then(make_user):
    make_user("victim", password="the-right-password-1")
    client = APIClient()
    codes = [client.post("/api/auth/token/", {"username": "victim", "password": f"wrong-{i}"}).status_code
             for i in range(12)]
    assert codes[:10] == [400] * 10 and codes[10:] == [429, 429], codes
    response = client.post("/api/auth/token/", {"username": "victim", "password": "the-right-password-1"})
    error = assert_error_shape(response, 429, "throttled")
    assert int(response["Retry-After"]) > 0 and "failed sign-in" in error["message"]


def test_a_correct_login_is_never_throttled_by_successes(make_user):
    make_user("busy", password="the-right-password-1")
    client = APIClient()
    for _ in range(15):
        response = client.post("/api/auth/token/", {"username": "busy", "password": "the-right-password-1"})
        assert response.status_code == 200 and response.json()["token"]


def test_the_sign_in_page_is_throttled_like_the_api(make_user):
    from django.test import Client

    make_user("pagevictim", password="the-right-password-1")
    client = Client()
    for i in range(10):
        assert client.post("/login/", {"username": "pagevictim", "password": f"wrong-{i}"}).status_code == 200
    response = client.post("/login/", {"username": "pagevictim", "password": "the-right-password-1"})
    assert response.status_code == 429 and b"Too many failed sign-in attempts" in response.content
