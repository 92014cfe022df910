"""podserve: Kubernetes-native ONNX model serving."""

__version__ = "0.1.0"
