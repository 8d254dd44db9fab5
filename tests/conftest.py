"""Shared fixtures: the tiny offline model and tokenizer, built once per test session."""

import os
import tempfile
from pathlib import Path

import pytest

# Before any lmtune import builds a model: keep the session's builtin models out of the user's cache.
os.environ.setdefault("LMTUNE_HOME", tempfile.mkdtemp(prefix="lmtune-test-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# A copy of the project's compatibility corpus (shared/compat, with its sources
# and licences in README.md), so a clone of this repository tests on its own.
COMPAT = ROOT / "tests" / "fixtures" / "compat"
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from lmtune.model.builtin import builtin_path

    return builtin_path("builtin:tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture()
def fresh_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(autouse=True)
def library_log_levels_stay_per_test():
    """A run with `sagemaker_container_log_level` sets the libraries' log levels for its process (a SageMaker
    job is one process); here many runs share one, so each test starts from the levels it found."""
    import logging

    root = logging.getLogger().level
    yield
    logging.getLogger().setLevel(root)
    import sys

    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
