#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and serve the Label Studio ML backend.
# Any BOXLOOP_* variable configures it (see docs/backend.md); arguments go to `boxloop serve`.
# If the shared COCO YOLOX model is next to the repo, it pre-annotates before the first training.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
shared=${BOXLOOP_SHARED_DATA:-$(cd .. && pwd)/shared/data}
if [ -z "${BOXLOOP_ONNX_MODEL_PATH:-}" ] && [ -f "$shared/models/yolox_nano_coco/yolox_nano.onnx" ]; then
  export BOXLOOP_ONNX_MODEL_PATH="$shared/models/yolox_nano_coco/yolox_nano.onnx"
fi
export BOXLOOP_DATA_DIR=${BOXLOOP_DATA_DIR:-$PWD/var/boxloop}
exec .venv/bin/boxloop serve --host "${BOXLOOP_HOST:-0.0.0.0}" --port "${BOXLOOP_PORT:-9090}" "$@"
