"""Parameter-efficient adapters over a frozen model: (IA)3, LoRA and their mixtures MoV and MoLoRA.

``apply_adapters(model, MoVConfig(num_experts=10))`` injects the adapters into any ``torch.nn.Module``
(Hugging Face families are recognised by name), freezes the rest, and leaves the outputs unchanged until
training moves the adapters. Linear layers and expert banks (moekit's ``ExpertBank``, transformers' fused experts
modules: per-expert adapters, :mod:`moekit.adapters.experts`) are the sites. See docs/ALGORITHMS.md section 5
for the math and ``moekit finetune`` for the multitask recipe.
"""

from moekit.adapters.config import (
    AdapterConfig,
    IA3Config,
    LoRAConfig,
    MoLoRAConfig,
    MoVConfig,
    adapter_config_from_dict,
    adapter_config_to_dict,
)
from moekit.adapters.experts import BankAdapter, BankSpec, bank_spec
from moekit.adapters.inject import (
    adapter_config,
    adapter_sites,
    adapter_state_dict,
    apply_adapters,
    iter_adapters,
    merge_adapters,
    trainable_parameters,
)
from moekit.adapters.io import load_adapters, save_adapters
from moekit.adapters.recording import RouterRecorder, record_router_probs, set_sequence_mask

__all__ = [
    "AdapterConfig", "BankAdapter", "BankSpec", "IA3Config",
    "LoRAConfig", "MoLoRAConfig", "MoVConfig", "RouterRecorder",
    "adapter_config", "adapter_config_from_dict", "adapter_config_to_dict",
    "adapter_sites", "adapter_state_dict", "apply_adapters", "bank_spec",
    "iter_adapters", "load_adapters", "merge_adapters", "record_router_probs", "save_adapters",
    "set_sequence_mask", "trainable_parameters",
]
