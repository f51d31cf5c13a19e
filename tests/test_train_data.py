"""What the trainer reads of each example."""

import polars as pl

from conftest import make_examples
from engine.models import load_tokenizer
from engine.train.data import encode


def test_a_row_with_an_unmapped_teacher_token_is_left_out_of_training(tiny_llm_dir):
    """An openai teacher stores -1 for a token its text did not map to: that row's targets are unknown."""
    examples = make_examples(tiny_llm_dir, prompts=["Is the sky blue?", "Is fire cold?"])
    tokens = examples["token_ids"].to_list()
    tokens[1] = [tokens[1][0], -1, *tokens[1][2:]]
    broken = examples.with_columns(token_ids=pl.Series(tokens, dtype=pl.List(pl.Int32)))
    tokenizer = load_tokenizer(str(tiny_llm_dir))
    kept = encode(broken, tokenizer, broken["teacher_prompt"].to_list())
    assert [e.token_ids for e in kept] == [tokens[0]]
    assert len(encode(examples, tokenizer, examples["teacher_prompt"].to_list())) == 2
