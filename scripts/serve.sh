#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and serve the Label Studio ML backend.
# Any BOXLOOP_* variable configures it (see docs/backend.md), or a BOXLOOP_CONFIG settings file;
# arguments go to `boxloop serve`. Host, port and data dir not set by either default to
# 0.0.0.0, 9090 and ./var/boxloop (an empty variable counts as unset, as boxloop reads it).
# The COCO YOLOX-Nano model pre-annotates before the first training and is what the default
# detector (yolox_nano) trains from: the shared copy when it is next to the repo, else the one
# `boxloop models fetch` put in the data dir, else it is fetched now (needs internet); without
# it the backend still serves, with no pre-annotations and no training until then.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
shared=${BOXLOOP_SHARED_DATA:-$(cd .. && pwd)/shared/data}

# The settings the BOXLOOP_CONFIG file sets (a file boxloop cannot read: none; boxloop says why).
in_config=""
if [ -n "${BOXLOOP_CONFIG:-}" ]; then
  in_config=$(.venv/bin/python -c '
import sys, yaml
try:
    values = yaml.safe_load(open(sys.argv[1])) or {}
except Exception:
    values = {}
print(" ".join(str(k) for k in values) if isinstance(values, dict) else "")
' "$BOXLOOP_CONFIG") || in_config=""
fi

# default VARIABLE KEY VALUE: export VALUE unless the variable or the config file sets KEY
default() {
  if [ -z "${!1:-}" ] && [[ " $in_config " != *" $2 "* ]]; then
    export "$1=$3"
  fi
}
default BOXLOOP_HOST host 0.0.0.0
default BOXLOOP_PORT port 9090
default BOXLOOP_DATA_DIR data_dir "$PWD/var/boxloop"

if [ -z "${BOXLOOP_ONNX_MODEL_PATH:-}" ] && [[ " $in_config " != *" onnx_model_path "* ]]; then
  if [ -f "$shared/models/yolox_nano_coco/yolox_nano.onnx" ]; then
    export BOXLOOP_ONNX_MODEL_PATH="$shared/models/yolox_nano_coco/yolox_nano.onnx"
  elif ! .venv/bin/boxloop models fetch --if-missing --timeout 30 >/dev/null; then
    cat >&2 <<MSG
boxloop: could not fetch the COCO YOLOX-Nano model (error above). The backend starts anyway,
but NOTHING WILL BE PRE-ANNOTATED, AND TRAINING THE DEFAULT DETECTOR (yolox_nano) FAILS, until
the model is there. Fetch it into the data dir (${BOXLOOP_DATA_DIR:-data_dir of $BOXLOOP_CONFIG})
and restart scripts/serve.sh:
  .venv/bin/boxloop models fetch                    # needs access to github.com
  .venv/bin/boxloop models fetch --url URL_OR_FILE  # a mirror, or a yolox_nano.onnx you copied here
or point BOXLOOP_ONNX_MODEL_PATH at a YOLOX ONNX model.
MSG
  fi
fi
exec .venv/bin/boxloop serve "$@"
