"""Subprocesses of these tests (the runner) start with this folder on PYTHONPATH and get the torchvision shim."""

from torchvision_shim import import_torchvision

import_torchvision()
