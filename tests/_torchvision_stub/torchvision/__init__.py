"""Tests-only stand-in: pytorchvideo's model package imports torchvision.ops.RoIAlign at import time.

X3D never uses that op, and torchvision cannot be installed beside the CPU torch build. This folder
is put on sys.path by tests/conftest.py only when the real torchvision is missing.
"""
