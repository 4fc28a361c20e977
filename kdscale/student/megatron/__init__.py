"""Megatron-Core student backend (TP/PP/VPP/DP): ``model`` builds a GPTModel from a Hugging Face config.json;
``cpu_compat`` lets Megatron-Core run on a CPU-only torch over gloo (activated explicitly, only without CUDA).

Nothing is imported here, so that ``kdscale.student`` can pick the backend lazily. Never imports FSDP2 code.
"""
