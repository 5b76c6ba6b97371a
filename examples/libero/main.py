"""Evaluate a policy on LIBERO, optionally DuQuant-quantized: the documented entry point (same as ``libero-eval``).

    python examples/libero/main.py policy=embedded quant=w4a8 suite=libero_spatial
    python examples/libero/main.py -m quant=fp,w4a8 suite=libero_spatial,libero_object
"""

from libero_eval.cli import main

if __name__ == "__main__":
    main()
