"""Same as the `libero-eval-serve` command (libero_eval/serve.py), for a checkout whose venv has the project installed."""

from libero_eval.serve import main

if __name__ == "__main__":
    main()
