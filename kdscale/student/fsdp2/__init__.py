"""PyTorch FSDP2 student backend: ``backend.FSDP2Backend`` (parallelize, module, checkpoint are its parts).

Nothing is imported here, so that ``kdscale.student`` can pick the backend lazily. Never imports Megatron.
"""
