#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and serve the Label Studio ML backend.
# Any BOXLOOP_* variable configures it (see docs/backend.md); arguments go to `boxloop serve`.
# The COCO YOLOX-Nano model pre-annotates before the first training: the shared copy when it is
# next to the repo, else the one `boxloop models fetch` put in the data dir, else it is fetched
# now (needs internet); without it the backend still serves, with no pre-annotations until then.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
shared=${BOXLOOP_SHARED_DATA:-$(cd .. && pwd)/shared/data}
export BOXLOOP_DATA_DIR=${BOXLOOP_DATA_DIR:-$PWD/var/boxloop}
if [ -z "${BOXLOOP_ONNX_MODEL_PATH:-}" ]; then
  if [ -f "$shared/models/yolox_nano_coco/yolox_nano.onnx" ]; then
    export BOXLOOP_ONNX_MODEL_PATH="$shared/models/yolox_nano_coco/yolox_nano.onnx"
  elif ! .venv/bin/boxloop models fetch --if-missing --timeout 30 >/dev/null; then
    cat >&2 <<MSG
boxloop: could not fetch the COCO YOLOX-Nano model (error above). The backend starts anyway,
but NOTHING WILL BE PRE-ANNOTATED until a project's first training. To pre-annotate now, fetch
the model into BOXLOOP_DATA_DIR=$BOXLOOP_DATA_DIR and restart scripts/serve.sh:
  .venv/bin/boxloop models fetch                    # needs access to github.com
  .venv/bin/boxloop models fetch --url URL_OR_FILE  # a mirror, or a yolox_nano.onnx you copied here
or point BOXLOOP_ONNX_MODEL_PATH at a YOLOX ONNX model.
MSG
  fi
fi
exec .venv/bin/boxloop serve --host "${BOXLOOP_HOST:-0.0.0.0}" --port "${BOXLOOP_PORT:-9090}" "$@"
