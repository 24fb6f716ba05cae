// JSON API client: session cookie + CSRF header, Karyo's {"error": {code, message}} shape.

export class ApiError extends Error {
  constructor(status, code, message, details = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export function cookie(name, source = globalThis.document?.cookie ?? "") {
  for (const part of source.split(";")) {
    const [key, ...rest] = part.trim().split("=");
    if (key === name) return decodeURIComponent(rest.join("="));
  }
  return null;
}

// The message people see for a failed response body (JSON error, DRF detail, or plain text).
export function errorFrom(status, body) {
  if (body && typeof body === "object") {
    if (body.error && typeof body.error === "object") {
      return new ApiError(status, body.error.code || "error", body.error.message || `HTTP ${status}`, body.error.details);
    }
    if (typeof body.detail === "string") return new ApiError(status, "error", body.detail);
  }
  // Plain-text bodies are shown; HTML error pages (proxies, Django's 500) are not.
  const text = typeof body === "string" && body.trim() && body.length < 300 && !body.includes("<") ? body.trim() : null;
  const fallback = {
    401: "You are signed out. Sign in again to continue.",
    403: "Your role in this project does not allow this.",
    404: "Not found (or you are not a member of this project).",
    413: "That upload is too large.",
    500: "The server failed on this request. Try again; if it persists, tell an administrator.",
    502: "The server is unreachable (bad gateway).",
    503: "The server is busy or restarting. Try again in a moment.",
  }[status];
  return new ApiError(status, "http_" + status, text || fallback || `Request failed (HTTP ${status})`);
}

export async function api(path, { method = "GET", body, form, signal, headers = {} } = {}) {
  const init = { method, credentials: "same-origin", signal, headers: { Accept: "application/json", ...headers } };
  if (method !== "GET" && method !== "HEAD") {
    const token = cookie("csrftoken");
    if (token) init.headers["X-CSRFToken"] = token;
  }
  if (form) init.body = form;
  else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err?.name === "AbortError") throw err;
    throw new ApiError(0, "network", "The server cannot be reached. Check your connection; Karyo retries live updates by itself.");
  }
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await response.json().catch(() => null) : await response.text();
  if (!response.ok) throw errorFrom(response.status, data);
  return data;
}

// Every page of a LimitOffset-paginated list (bounded: `max` items).
export async function listAll(path, { max = 2000 } = {}) {
  const items = [];
  let url = path + (path.includes("?") ? "&" : "?") + "limit=200";
  while (url && items.length < max) {
    const page = await api(url);
    if (Array.isArray(page)) return page;
    items.push(...page.results);
    url = page.next ? new URL(page.next, location.origin).pathname + new URL(page.next, location.origin).search : null;
  }
  return items;
}
