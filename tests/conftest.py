"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest

from flagscale.data import default_corpus_path, default_tokenizer_path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """The bundled corpus preprocessed with the bundled tokenizer: a real dataset prefix."""
    from flagscale.data import load_tokenizer, preprocess

    prefix = tmp_path_factory.mktemp("corpus") / "corpus"
    preprocess([default_corpus_path()], str(prefix), load_tokenizer(default_tokenizer_path()),
               workers=1, progress=False)
    return str(prefix)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> str:
    return str(default_tokenizer_path())
