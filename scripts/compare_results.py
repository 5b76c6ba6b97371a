"""Same as the `libero-eval-compare` command (libero_eval/compare.py), for a checkout whose venv has the project installed."""

from libero_eval.compare import main

if __name__ == "__main__":
    main()
