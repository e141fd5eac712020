"""``python -m fxtl`` == ``fxtl`` (also what ``torchrun -m fxtl`` runs)."""
from .cli import main

if __name__ == "__main__":
    main()
