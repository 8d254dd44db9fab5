"""lmtune: fine-tune causal language models from one YAML file.

Importing the package is light on purpose (no torch): `check` and `explain`
answer in a fraction of a second.
"""

__version__ = "0.1.0"
