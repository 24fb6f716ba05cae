"""OpenAPI: every operation documents Karyo's error shape (``{"error": {code, message, details}}``)."""
from __future__ import annotations

ERROR_COMPONENT = {
    "type": "object",
    "description": "Every error under /api/ has this shape (backend.common.errors).",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "stable machine-readable code, e.g. validation_error"},
                "message": {"type": "string", "description": "what went wrong, for people; names the field"},
                "details": {"nullable": True, "description": "per-field errors or other structured detail"},
            },
            "required": ["code", "message", "details"],
        }
    },
    "required": ["error"],
}
DESCRIPTIONS = {
    "400": "Invalid input: the message names the field.",
    "401": "Not signed in (no or an invalid token).",
    "403": "Signed in, but the role does not allow this.",
    "404": "No such object, or one in a project the caller is not a member of.",
    "405": "Method not allowed.",
    "409": "Conflict with the current state.",
    "413": "The request body is over the size limit.",
    "415": "Unsupported media type or file format.",
    "429": "Too many requests (failed sign-ins).",
    "500": "Internal error; the server log has the details.",
    "503": "A service Karyo depends on (the file store) did not answer; try again later.",
}


def document_errors(result, generator, request, public):
    """drf-spectacular post-processing hook: add the error responses to every operation."""
    components = result.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR_COMPONENT
    reference = {"$ref": "#/components/schemas/Error"}
    for path, item in result.get("paths", {}).items():
        for method, operation in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            codes = ["400", "401", "403", "404", "405", "409", "413", "415", "500", "503"]
            if path.endswith("/auth/token/"):
                codes.append("429")
            responses = operation.setdefault("responses", {})
            for code in codes:
                responses.setdefault(code, {"description": DESCRIPTIONS[code],
                                            "content": {"application/json": {"schema": reference}}})
    return result
