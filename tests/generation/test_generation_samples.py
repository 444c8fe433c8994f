"""Cleaning of generated token ids: cut at the first stop token, strip EOS text and leading space."""

from __future__ import annotations

from nemo_dft.generation.samples import clean_sample, generated_length, is_empty, stop_token_ids


def test_samples_are_cut_at_the_first_stop_token_and_left_stripped(tiny_tokenizer, tiny_model) -> None:
    tok = tiny_tokenizer
    stops = stop_token_ids(tiny_model, None, tok)
    assert stops == {tok.eos_token_id}
    body = tok("  ok then", add_special_tokens=False)["input_ids"]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert clean_sample([*body, eos, *body, pad], tok, stops) == ("ok then", True)
    assert generated_length([*body, eos, pad, pad], stops) == len(body) + 1
    assert clean_sample(body, tok, stops) == ("ok then", False)  # length cap: no stop token
    assert generated_length(body, stops) == len(body)
    text_eos = tok("x</s>y", add_special_tokens=False)["input_ids"]
    assert clean_sample(text_eos, tok, set()) == ("xy", False)  # EOS text removed even without its id
    assert clean_sample([eos, *body], tok, stops) == ("", True)
    assert is_empty("") and is_empty(" \n") and not is_empty(" a")
