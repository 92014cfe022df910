"""podserve: Kubernetes-native ONNX model serving."""

import os

# ONNX Runtime >= 1.2x keeps a telemetry database under $HOME/.cache on import: a write outside
# the configured directories (read-only root filesystem). Off unless the operator says otherwise.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
