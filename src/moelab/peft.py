"""``moelab.peft``: the short name of ``moelab.integrations.peft`` (the same module object)."""

import sys

from moelab.integrations import peft as _peft

sys.modules[__name__] = _peft
