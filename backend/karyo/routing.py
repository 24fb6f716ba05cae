"""WebSocket routes (live progress streams are added by the active-learning app)."""
websocket_urlpatterns: list = []
