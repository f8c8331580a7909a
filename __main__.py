"""``python -m litplug`` is the ``litplug`` command."""

from .cli import main

if __name__ == "__main__":
    main()
