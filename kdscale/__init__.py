"""kdscale: distill large language models at cluster scale.

The teacher ships final-norm hidden states (never logits) to the student ranks that consume them; the student
recomputes the teacher logits with the teacher's output head inside a chunked loss. See README.md.
"""

__version__ = "0.1.0"
