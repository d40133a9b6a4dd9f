"""Model surgery: which modules to adapt, and replacing them with LoRA wrappers and back."""

from .matching import InjectionPlan, Target, corrected_fan_in_fan_out, plan_injection
from .surgery import apply_injection, iter_wrappers, replace_module, unwrap_model, wrapped_module

__all__ = [
    "InjectionPlan",
    "Target",
    "apply_injection",
    "corrected_fan_in_fan_out",
    "iter_wrappers",
    "plan_injection",
    "replace_module",
    "unwrap_model",
    "wrapped_module",
]
