"""Expert banks (one kind per file; importing this package registers them) and shared experts."""

from moelab.experts.atomic import AtomicBank
from moelab.experts.bank import ExpertBank
from moelab.experts.film import FiLMBank
from moelab.experts.lora import LoRABank
from moelab.experts.shared import SharedExperts

__all__ = ["AtomicBank", "ExpertBank", "FiLMBank", "LoRABank", "SharedExperts"]
