"""numbarope as an attention backend of Hugging Face transformers (short name).

``import numbarope.integrations`` registers ``attn_implementation="numbarope"``; the
backend itself is :mod:`numbarope.backends.transformers` (this module re-exports
it, and stays).
"""

from .backends.transformers import (NAME, attention_forward, mask_structure,  # noqa: F401
                                    register)

__all__ = ["register", "attention_forward", "mask_structure", "NAME"]
