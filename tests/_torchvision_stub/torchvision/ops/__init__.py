"""Tests-only stand-in for torchvision.ops (see the package docstring)."""


class RoIAlign:  # noqa: D101 - imported by pytorchvideo, never constructed by X3D
    def __init__(self, *args, **kwargs):
        raise RuntimeError("tests/_torchvision_stub: RoIAlign is not available in the test stand-in")
