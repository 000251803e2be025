"""Shared pytest setup: import the flat repo modules, and let pytorchvideo import without torchvision."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if importlib.util.find_spec("torchvision") is None:
    sys.path.append(os.path.join(ROOT, "tests", "_torchvision_stub"))
