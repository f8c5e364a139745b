"""``python -m futurepool`` is the ``futurepool`` command."""

from .cli import main

if __name__ == "__main__":
    main()
