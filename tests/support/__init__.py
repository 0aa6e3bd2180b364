"""Shared test support: tiny model builders, model files, the ComfyUI and browser harnesses, the workflow format
reader and the fixtures more than one tier uses. Imported as ``support`` (pytest puts ``tests/`` on the path, see
``pythonpath`` in pyproject.toml); ``tools/`` and ``benchmarks/`` use it too. Test modules never import each other.
"""
