#!/usr/bin/env bash
# Install Label Studio into its own virtual environment (never the project's: its Django
# version differs from Karyo's). Idempotent: does nothing when the pinned version is there.
#
#   KARYO_LABEL_STUDIO_HOME  where to install (default ~/.cache/karyo/label-studio-1.23.2)
#   PYTHON                   interpreter for the venv (default python3; 3.10-3.12)
#
# Besides the venv it keeps data-template/: an empty, fully migrated Label Studio database
# (no users, no secret key). start.sh seeds new data folders from it, so that a first start
# takes seconds instead of a minute of migrations.
set -euo pipefail
VERSION=1.23.2
HOME_DIR="${KARYO_LABEL_STUDIO_HOME:-$HOME/.cache/karyo/label-studio-$VERSION}"
PYTHON="${PYTHON:-python3}"
VENV="$HOME_DIR/venv"
STAMP="$VENV/.karyo-installed-$VERSION"
TEMPLATE="$HOME_DIR/data-template"

make_template() {
  [[ -f "$TEMPLATE/label_studio.sqlite3" ]] && return 0
  echo "migrating an empty Label Studio database into $TEMPLATE (once) ..."
  local building="$TEMPLATE.building.$$"
  rm -rf "$building" && mkdir -p "$building"
  env -i PATH="$VENV/bin:/usr/bin:/bin" HOME="$HOME" LANG=C.UTF-8 LABEL_STUDIO_BASE_DATA_DIR="$building" \
    COLLECT_ANALYTICS=false SENTRY_DSN= FRONTEND_SENTRY_DSN= LATEST_VERSION_CHECK=false LOG_LEVEL=WARNING \
    "$VENV/bin/python" -c "from label_studio.server import _setup_env, _apply_database_migrations
_setup_env(); _apply_database_migrations()" > "$building.log" 2>&1 || { cat "$building.log" >&2; exit 1; }
  rm -f "$building/.env" "$building.log"  # each data folder generates its own secret key
  rm -rf "$TEMPLATE" && mv "$building" "$TEMPLATE"
}

if [[ -f "$STAMP" && -x "$VENV/bin/label-studio" ]]; then
  make_template
  echo "label-studio $VERSION already installed in $VENV"
  exit 0
fi
mkdir -p "$HOME_DIR"
echo "installing label-studio $VERSION into $VENV (about 1 GB, a minute or two) ..."
started=$(date +%s)
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/pip" install --quiet --disable-pip-version-check "label-studio==$VERSION"
# Never run `label-studio --version`: it starts a server on 0.0.0.0:8080. Ask pip instead.
"$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('label-studio') == '$VERSION'"
touch "$STAMP"
make_template
echo "label-studio $VERSION installed in $VENV in $(( $(date +%s) - started ))s"
