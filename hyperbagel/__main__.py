"""``python -m hyperbagel``: the same command as the ``hyperbagel`` console script."""

from hyperbagel.cli import main

if __name__ == "__main__":
    main()
