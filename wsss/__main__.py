"""``python -m wsss ...`` is the same as ``wsss ...``."""

from wsss.cli import main

if __name__ == "__main__":
    main()
