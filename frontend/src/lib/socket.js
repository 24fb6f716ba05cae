// The project's live event stream (/ws/projects/<id>/), reconnecting with backoff.

export function backoffDelay(attempt, { base = 500, max = 15000 } = {}) {
  return Math.min(max, base * 2 ** Math.max(0, attempt));
}

export class ProjectSocket {
  constructor(projectId, { onEvent, onStatus } = {}) {
    this.projectId = projectId;
    this.onEvent = onEvent || (() => {});
    this.onStatus = onStatus || (() => {});
    this.listeners = new Set();
    this.attempt = 0;
    this.closed = false;
    this.status = "connecting";
    this.connect();
    this.pinger = setInterval(() => this.send({ kind: "ping" }), 25000);
  }

  url() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    return `${scheme}://${location.host}/ws/projects/${this.projectId}/`;
  }

  setStatus(status) {
    if (status === this.status) return;
    this.status = status;
    this.onStatus(status);
  }

  connect() {
    if (this.closed) return;
    this.setStatus(this.attempt ? "reconnecting" : "connecting");
    let ws;
    try {
      ws = new WebSocket(this.url());
    } catch {
      this.retry();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.setStatus("live");
    };
    ws.onmessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      if (event.kind === "pong") return;
      this.onEvent(event);
      for (const listener of this.listeners) listener(event);
    };
    ws.onclose = (e) => {
      this.ws = null;
      if (e.code === 4403) {
        this.setStatus("forbidden");
        return;
      }
      this.retry();
    };
    ws.onerror = () => {};
  }

  retry() {
    if (this.closed) return;
    this.setStatus("offline");
    const delay = backoffDelay(this.attempt++);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  send(payload) {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(payload));
  }

  subscribe(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    clearInterval(this.pinger);
    if (this.ws) this.ws.close();
  }
}
