"""Adapters for other runtimes: `to_openvino` writes a copy OpenVINO GenAI runs as trained."""

from lorakit.export.openvino import to_openvino

__all__ = ["to_openvino"]
