"""The browser UI: pages (a login form and the single-page app's shell) and the small API the
pages need beyond the platform's (backend.web.api)."""
