"""``python -m moelab.cli``: the ``moelab`` command (torchrun uses this form)."""

from moelab.cli import app

app()
