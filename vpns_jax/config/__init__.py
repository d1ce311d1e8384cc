"""Shared parts of config files, importable from a clone or an installed package.

``base`` is every config's starting point (the authors' reference setting); ``offline`` is the offline default task
that ``configs/default.py`` and ``configs/default_vit.py`` run.
"""
