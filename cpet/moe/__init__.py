"""MoEfication building blocks: expert banks, the MoEfied FFN and its router, balanced clustering, and peft
LoRA on expert banks. The compression stage that uses them is :mod:`cpet.compress.moefy`."""

from .clustering import balanced_assign, balanced_kmeans, expert_order
from .experts import ExpertBank, LowRankPath, Routed, bank_of
from .layer import MoEFFN, Router, choose_experts, count_attended_tokens_only

__all__ = ["ExpertBank", "LowRankPath", "Routed", "bank_of", "MoEFFN", "Router", "choose_experts",
           "count_attended_tokens_only", "balanced_assign", "balanced_kmeans", "expert_order"]
