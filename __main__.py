"""``python -m litplug`` is the ``litplug`` command."""

from litplug.cli import main

if __name__ == "__main__":
    main()
