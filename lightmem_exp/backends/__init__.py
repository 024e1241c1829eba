"""Memory-manager inference backends: `local_hf_lora` (a local Hugging Face base model + LoRA adapter) and the
JSON extraction/repair its replies go through."""

from lightmem_exp.backends.local_hf_lora import CallError, CallOk, LocalHFLoraBackend, LocalHFLoraConfig

__all__ = ["CallError", "CallOk", "LocalHFLoraBackend", "LocalHFLoraConfig"]
