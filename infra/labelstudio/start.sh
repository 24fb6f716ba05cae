#!/usr/bin/env bash
# Start Label Studio in the foreground on loopback, with a bootstrap admin and a known API token.
#
#   LABEL_STUDIO_PORT        port on 127.0.0.1 (default 8080); a busy port is an error
#   LABEL_STUDIO_DATA_DIR    its database and uploads (default ${KARYO_VAR_DIR:-var}/label-studio)
#   LABEL_STUDIO_USERNAME    admin e-mail (default admin@karyo.local)
#   LABEL_STUDIO_PASSWORD    admin password      } generated once into DATA_DIR/karyo-credentials.env
#   LABEL_STUDIO_USER_TOKEN  admin's API token   } when not set
#   KARYO_LABEL_STUDIO_HOME  the installation (see install.sh)
#
# This is a *local* install: webhooks and ML backends on loopback are allowed
# (SSRF_PROTECTION_ENABLED=false, ML_BLOCK_LOCAL_IP=false). Never use these settings on a
# Label Studio reachable from other machines.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VERSION=1.23.2
HOME_DIR="${KARYO_LABEL_STUDIO_HOME:-$HOME/.cache/karyo/label-studio-$VERSION}"
VENV="$HOME_DIR/venv"
if [[ ! -x "$VENV/bin/label-studio" ]]; then
  echo "Label Studio is not installed; install it with: make labelstudio-install (infra/labelstudio/install.sh)" >&2
  exit 3
fi
PORT="${LABEL_STUDIO_PORT:-8080}"
DATA_DIR="${LABEL_STUDIO_DATA_DIR:-${KARYO_VAR_DIR:-$ROOT/var}/label-studio}"
mkdir -p "$DATA_DIR"
chmod 700 "$DATA_DIR"
# A new data folder starts from the migrated template (install.sh): seconds, not a minute.
if [[ ! -f "$DATA_DIR/label_studio.sqlite3" && -f "$HOME_DIR/data-template/label_studio.sqlite3" ]]; then
  cp -R "$HOME_DIR/data-template/." "$DATA_DIR/"
fi

# Label Studio silently moves to another port when its port is taken: refuse instead.
if ! "$VENV/bin/python" - "$PORT" <<'PY'
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
then
  echo "error: 127.0.0.1:$PORT is in use; set LABEL_STUDIO_PORT" >&2
  exit 2
fi

CREDENTIALS="$DATA_DIR/karyo-credentials.env"
if [[ ! -f "$CREDENTIALS" ]]; then
  umask 077
  {
    echo "LABEL_STUDIO_USERNAME=${LABEL_STUDIO_USERNAME:-admin@karyo.local}"
    echo "LABEL_STUDIO_PASSWORD=${LABEL_STUDIO_PASSWORD:-$("$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(18))')}"
    echo "LABEL_STUDIO_USER_TOKEN=${LABEL_STUDIO_USER_TOKEN:-$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(20))')}"
  } > "$CREDENTIALS"
fi
# Values from the environment win over the stored ones.
_user="${LABEL_STUDIO_USERNAME:-}"; _pass="${LABEL_STUDIO_PASSWORD:-}"; _token="${LABEL_STUDIO_USER_TOKEN:-}"
# shellcheck disable=SC1090
source "$CREDENTIALS"
LABEL_STUDIO_USERNAME="${_user:-$LABEL_STUDIO_USERNAME}"
LABEL_STUDIO_PASSWORD="${_pass:-$LABEL_STUDIO_PASSWORD}"
LABEL_STUDIO_USER_TOKEN="${_token:-$LABEL_STUDIO_USER_TOKEN}"

echo "label-studio: http://127.0.0.1:$PORT  login $LABEL_STUDIO_USERNAME (password and API token in $CREDENTIALS)"

# A clean environment: Label Studio also reads plain HOST, PORT, USERNAME, DATABASE_URL ...
# --enable-legacy-api-token only matters the first time (when the organization is created).
exec env -i PATH="$VENV/bin:/usr/bin:/bin" HOME="$HOME" LANG=C.UTF-8 \
  LABEL_STUDIO_USERNAME="$LABEL_STUDIO_USERNAME" \
  LABEL_STUDIO_PASSWORD="$LABEL_STUDIO_PASSWORD" \
  LABEL_STUDIO_USER_TOKEN="$LABEL_STUDIO_USER_TOKEN" \
  LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true \
  LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true \
  LABEL_STUDIO_BASE_DATA_DIR="$DATA_DIR" \
  COLLECT_ANALYTICS=false SENTRY_DSN= FRONTEND_SENTRY_DSN= LATEST_VERSION_CHECK=false \
  SSRF_PROTECTION_ENABLED=false ML_BLOCK_LOCAL_IP=false \
  WEBHOOK_TIMEOUT="${WEBHOOK_TIMEOUT:-5}" \
  LOG_LEVEL="${LABEL_STUDIO_LOG_LEVEL:-WARNING}" \
  "$VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 --port "$PORT" \
  --data-dir "$DATA_DIR" --enable-legacy-api-token
