"""One module per benchmarked op, each registering an ``OpSpec`` (see ``bench/registry.py`` and
``bench/README.md``)."""
