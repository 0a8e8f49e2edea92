"""Paper claims checked at small scale: each reproduction trains, measures and gives a verdict.

- ``claims``: the reproductions (``REPRODUCTIONS``), their arms and verdict rules;
- ``runner``: ``run_repro`` (a small ``moelab compare`` per seed) and ``missing_prerequisites``;
- ``docs``: the generated table of ``docs/reproductions.md``;
- ``multilingual``: the Bible-based reproduction (needs diatheke and two SWORD Bibles).

``moelab repro`` (``moelab.cli.repro``) is the command line.
"""
