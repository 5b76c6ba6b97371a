"""Runner subprocesses of these tests start with this folder on PYTHONPATH: lerobot's pi0/pi0.5 at the tiny
sizes of ``tiny_pi.py`` when TINY_PI_WIDTH is set (test scaffolding; see there)."""

from tiny_pi import apply_from_env

apply_from_env()
