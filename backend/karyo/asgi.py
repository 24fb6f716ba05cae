"""ASGI entry point: HTTP through Django's WSGI handler on a pool of threads, WebSockets through Channels.

Every view and middleware of Karyo is synchronous. Django's own ASGI handler runs each request on a
new thread (its per-request thread-sensitive context) and hops between the event loop and threads
at each middleware that is not async-capable; a new thread also means a new database connection
per request. Measured under 50 concurrent annotators (tests/load/RESULTS.md) that cost 12-14 ms of
server CPU per request against about 8.5 ms here: a2wsgi hands the whole request to one of
``KARYO_WEB_THREADS`` long-lived threads, which keep their database connections (CONN_MAX_AGE).
"""
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "backend.karyo.settings")

from django.core.wsgi import get_wsgi_application  # noqa: E402

django_http_app = get_wsgi_application()  # sets Django up before Channels' routing is imported

from a2wsgi import WSGIMiddleware  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from backend.common.ws_auth import KaryoAuthStack  # noqa: E402  (needs Django set up first)

from .routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": WSGIMiddleware(django_http_app, workers=settings.KARYO_WEB_THREADS),
        "websocket": AllowedHostsOriginValidator(KaryoAuthStack(URLRouter(websocket_urlpatterns))),
    }
)
