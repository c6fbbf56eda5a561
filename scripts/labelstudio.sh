#!/usr/bin/env bash
# Install and run a real Label Studio for the end-to-end tests and for local trials.
#
#   scripts/labelstudio.sh install
#       Create (or reuse) .venv-labelstudio/ in the repo root with label-studio==1.23.2.
#       Kept apart from .venv: Label Studio pins its own Django/SDK stack (~1 GB, ~50 s),
#       and the backend only needs label-studio-sdk. Idempotent via a stamp file.
#       Exit code 3 means PyPI could not be reached (the e2e fixture skips on that only).
#
#   scripts/labelstudio.sh start --port PORT --data-dir DIR --files-root DIR [--token T]
#                                [--username U] [--password P] [--host H]
#       Run it in the foreground (exec), headless, configured as docs/labelstudio.md and
#       ../shared/docs/label-studio.md describe: legacy API token enabled (otherwise the
#       token answers 401), banned subnets off (otherwise a backend on 127.0.0.1 is
#       refused with 403), local files served from --files-root, no analytics or
#       version checks (no network). Defaults: host 127.0.0.1, port 8080,
#       username admin@example.com, token and password from $LABEL_STUDIO_USER_TOKEN /
#       $LABEL_STUDIO_PASSWORD or generated and printed. The user, password and token are
#       created only with a new data dir: on a restart pass the same token.
#
#   scripts/labelstudio.sh path
#       Print the label-studio executable path (after install).
set -euo pipefail
CALLER_PWD=$PWD
cd "$(dirname "$0")/.."
ROOT=$(pwd)

LS_VERSION=1.23.2
VENV=${BOXLOOP_LABEL_STUDIO_VENV:-$ROOT/.venv-labelstudio}
STAMP=$VENV/.boxloop-label-studio
WANT="label-studio==$LS_VERSION"

die() { echo "labelstudio.sh: $*" >&2; exit 2; }

index_reachable() {
  # pip is quiet about connection failures with -q; ask the index for the project page.
  local index=${PIP_INDEX_URL:-$("$VENV/bin/pip" config get global.index-url 2>/dev/null || true)}
  index=${index:-https://pypi.org/simple}
  "$VENV/bin/python" - "$index" <<'PY'
import sys
import urllib.request

url = sys.argv[1].rstrip("/") + "/label-studio/"
try:
    with urllib.request.urlopen(url, timeout=20) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
    print(f"labelstudio.sh: {url}: {exc}", file=sys.stderr)
    sys.exit(1)
PY
}

install() {
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/label-studio" ]; then
    return 0
  fi
  mkdir -p "$VENV"
  # Two test sessions may install at once (the lead's and a helper's): serialise them.
  exec 9>"$VENV/.install.lock"
  flock 9
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/label-studio" ]; then
    return 0
  fi
  local py=${PYTHON:-python3.11}
  command -v "$py" >/dev/null || py=python3
  if [ ! -x "$VENV/bin/python" ]; then
    "$py" -m venv "$VENV"
  fi
  local t0=$SECONDS log
  log=$(mktemp)
  echo "labelstudio.sh: installing $WANT into $VENV (about 50 s, 1 GB)" >&2
  if ! "$VENV/bin/pip" install -q "$WANT" >"$log" 2>&1; then
    cat "$log" >&2
    # Only an unreachable index counts as "cannot install here"; anything else is a bug.
    if grep -qE 'NewConnectionError|ConnectTimeout|Temporary failure in name resolution|Network is unreachable|ProxyError' "$log" \
      || ! index_reachable; then
      rm -f "$log"
      echo "labelstudio.sh: PyPI unreachable: cannot install $WANT" >&2
      exit 3
    fi
    rm -f "$log"
    die "pip install $WANT failed"
  fi
  rm -f "$log"
  echo "$WANT" > "$STAMP"
  echo "labelstudio.sh: installed in $((SECONDS - t0)) s" >&2
}

start() {
  local host=127.0.0.1 port=8080 data_dir="" files_root=""
  local username=${LABEL_STUDIO_USERNAME:-admin@example.com}
  local password=${LABEL_STUDIO_PASSWORD:-}
  local token=${LABEL_STUDIO_USER_TOKEN:-}
  while [ $# -gt 0 ]; do
    case "$1" in
      --host) host=$2; shift 2 ;;
      --port) port=$2; shift 2 ;;
      --data-dir) data_dir=$2; shift 2 ;;
      --files-root) files_root=$2; shift 2 ;;
      --username) username=$2; shift 2 ;;
      --password) password=$2; shift 2 ;;
      --token) token=$2; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  [ -n "$data_dir" ] || die "start needs --data-dir"
  [ -n "$files_root" ] || die "start needs --files-root"
  [ -x "$VENV/bin/label-studio" ] || die "not installed: run scripts/labelstudio.sh install"
  # Relative paths are the caller's, not the repo root's (this script cd's there).
  data_dir=$(cd "$CALLER_PWD" && mkdir -p "$data_dir" && cd "$data_dir" && pwd)
  files_root=$(cd "$CALLER_PWD" && mkdir -p "$files_root" && cd "$files_root" && pwd)
  if [ -z "$token" ]; then
    token=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(20))')
    echo "labelstudio.sh: generated API token: $token" >&2
  fi
  [ ${#token} -ge 6 ] || die "the token needs 6 or more characters"
  if [ -z "$password" ]; then
    password=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(16))')
    echo "labelstudio.sh: generated password for $username: $password" >&2
  fi
  export LABEL_STUDIO_BASE_DATA_DIR=$data_dir
  export LABEL_STUDIO_USERNAME=$username
  export LABEL_STUDIO_PASSWORD=$password
  export LABEL_STUDIO_USER_TOKEN=$token
  export LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true
  export LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true
  export LOCAL_FILES_SERVING_ENABLED=true
  export LOCAL_FILES_DOCUMENT_ROOT=$files_root
  export USE_DEFAULT_BANNED_SUBNETS=false
  export LATEST_VERSION_CHECK=false
  export COLLECT_ANALYTICS=false
  export XDG_CONFIG_HOME=$data_dir/config
  exec "$VENV/bin/label-studio" start --no-browser --internal-host "$host" --port "$port" \
    --data-dir "$data_dir"
}

cmd=${1:-install}
[ $# -gt 0 ] && shift
case "$cmd" in
  install) install ;;
  start) start "$@" ;;
  path) echo "$VENV/bin/label-studio" ;;
  *) die "usage: $0 install | start --port P --data-dir D --files-root F [--token T] | path" ;;
esac
