"""Thin shim so that `python cli.py ...` works from a checkout exactly like `fxtl ...`."""
from fxtl.cli import main

if __name__ == "__main__":
    main()
