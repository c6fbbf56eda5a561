"""boxloop: a Label Studio ML backend for object detection, plus a benchmark harness."""

__version__ = "0.1.0"
