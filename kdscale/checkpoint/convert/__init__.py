"""HF <-> Megatron-Core checkpoint conversion: declarative mapping tables (``mapping.py``, ``families.py``),
Megatron formats (``formats.py``: torch_dist read/write, legacy read) and the two converters with their CLIs."""

from __future__ import annotations

from kdscale.checkpoint.convert.families import get_mapping_table, supported_model_types
from kdscale.checkpoint.convert.mapping import ConversionError, MappingTable, ModelDims


def hf_to_mcore_main(argv: list[str] | None = None) -> int:
    """``hf_to_mcore`` CLI (exit status)."""
    from kdscale.checkpoint.convert.hf_to_mcore import main

    return main(argv)


def mcore_to_hf_main(argv: list[str] | None = None) -> int:
    """``mcore_to_hf`` CLI (exit status)."""
    from kdscale.checkpoint.convert.mcore_to_hf import main

    return main(argv)


__all__ = [
    "ConversionError",
    "MappingTable",
    "ModelDims",
    "get_mapping_table",
    "hf_to_mcore_main",
    "mcore_to_hf_main",
    "supported_model_types",
]
