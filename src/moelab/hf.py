"""``moelab.hf``: the short name of ``moelab.integrations.hf`` (the same module object)."""

import sys

from moelab.integrations import hf as _hf

sys.modules[__name__] = _hf
