"""Same as the `libero-eval-merge` command (libero_eval/merge.py), for a checkout whose venv has the project installed."""

from libero_eval.merge import main

if __name__ == "__main__":
    main()
