"""What a response is trained and scored with (mipo/data/encoding.py, mipo/data/chat.py): the template's
end-of-turn token after a finished response (not always the eos), nothing after a cut one, and with
``data.response_suffix=template`` exactly the ids TRL's DPO tokenization gives."""

from __future__ import annotations

import pytest

from mipo.data.chat import TURN_END_ATTRIBUTE, find_turn_end, turn_end
from mipo.data.encoding import (
    RESPONSE_SUFFIXES,
    add_truncation_counts,
    encode_pairs,
    encode_prompt,
    encode_response,
    encode_rows,
    response_suffix_problems,
    set_response_suffix,
    truncation_counts,
    warn_truncation,
)
from mipo.data.pairs import PreferencePair
from tests.data.chat_families import FAMILIES, conversation, family_tokenizer
from tests.helpers import tiny_tokenizer

RESPONSES = ["the cat is on the mat.", "Two lines:\nthe first\n\nand the second", "42", "",
             "Ends with a newline? no, responses are stripped"]
LONG = 4096  # max_length: no truncation


def tokenizer(name: str, suffix: str = "end_of_turn"):
    tok = family_tokenizer(name)
    set_response_suffix(tok, suffix)
    return tok


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_turn_end_is_the_first_special_token_the_template_writes_after_the_reply(name):
    tok = family_tokenizer(name)
    end = find_turn_end(tok)
    assert end.from_template and tok.convert_ids_to_tokens(end.token_id) == FAMILIES[name].end_of_turn
    if name != "chatml":  # Llama-3, Gemma, Phi-3: the turn does not end with the eos
        assert end.token_id != tok.eos_token_id


def test_the_byte_tokenizer_ends_a_turn_with_its_eos_as_before():
    tok = tiny_tokenizer()
    end = turn_end(tok)
    assert end.token_id == tok.eos_token_id and end.suffix == "<|end|>\n"
    ids = tok("hi", add_special_tokens=False)["input_ids"]
    assert encode_response(tok, "hi") == ids + [tok.eos_token_id]
    assert encode_response(tok, "hi", finished=False) == ids


def test_a_template_without_an_end_of_turn_token_falls_back_to_the_eos():
    tok = family_tokenizer("chatml")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    end = find_turn_end(tok)
    assert (end.token_id, end.suffix, end.from_template) == (tok.eos_token_id, tok.eos_token, False)
    set_response_suffix(tok, "template")  # both conventions are then y + eos
    assert encode_response(tok, "a b") == tok("a b", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_trained_ids_end_with_the_end_of_turn_token_and_a_cut_response_has_none(name):
    tok = tokenizer(name)
    end_of_turn = tok.convert_tokens_to_ids(FAMILIES[name].end_of_turn)
    prompt = conversation(name, "Where is the cat?")
    pairs = [PreferencePair(prompt, "the cat is on the mat.", "the dog is out",
                            {"chosen_finish_reason": "eos", "rejected_finish_reason": "length"})]
    chosen, rejected = encode_pairs(tok, pairs, LONG, 1024)
    text_ids = tok("the cat is on the mat.", add_special_tokens=False)["input_ids"]
    assert list(chosen[0].response_ids) == text_ids + [end_of_turn]
    assert list(rejected[0].response_ids) == tok("the dog is out", add_special_tokens=False)["input_ids"]
    assert end_of_turn not in rejected[0].response_ids and tok.eos_token_id not in rejected[0].response_ids
    rows = encode_rows(tok, [prompt] * 2, ["a", "b"], LONG, 1024, finished=[True, False])
    assert rows[0].response_ids[-1] == end_of_turn and rows[1].response_ids[-1] != end_of_turn


def trl_ids(tok, prompt, response: str) -> tuple[list[int], list[int]]:
    """TRL's DPO tokenization of a conversational row: the chat template applied to the prompt (with the
    generation prompt) and to prompt + the assistant's response; the response ids are the tokens of the
    whole rendering after the prompt's tokens (trl/data_utils.py ``apply_chat_template``, DPOTrainer)."""
    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    prompt_ids = ids(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))
    full = ids(tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False))
    assert full[: len(prompt_ids)] == prompt_ids
    return prompt_ids, full[len(prompt_ids):]


@pytest.mark.parametrize("name", sorted(FAMILIES))  # ChatML and Llama-3 asked for; Gemma and Phi-3 agree too
def test_response_suffix_template_gives_trls_token_ids(name):
    tok = tokenizer(name, "template")
    prompts = [conversation(name, f"Question {i}: where is the cat?") for i in range(len(RESPONSES))]
    rows = encode_rows(tok, prompts, RESPONSES, LONG, 1024)
    for prompt, response, row in zip(prompts, RESPONSES, rows):
        prompt_ids, response_ids = trl_ids(tok, prompt, response)
        assert list(row.prompt_ids) == prompt_ids
        assert list(row.response_ids) == response_ids, (response, tok.convert_ids_to_tokens(response_ids))
    # a cut response still ends nowhere: no end-of-turn token, no template text
    cut = encode_rows(tok, prompts[:1], RESPONSES[:1], LONG, 1024, finished=[False])[0]
    assert list(cut.response_ids) == tok(RESPONSES[0], add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name, extra", [("chatml", ["\n"]), ("llama3", []), ("gemma", ["\n"]),
                                         ("phi3", ["\n", "<|endoftext|>"])])
def test_the_two_conventions_differ_by_the_text_after_the_end_of_turn_token(name, extra):
    """SmolLM2 (ChatML): TRL trains on one token more than the paper's code, the newline after <|im_end|>."""
    prompt = conversation(name, "Where is the cat?")
    default = encode_rows(tokenizer(name), [prompt], RESPONSES[:1], LONG, 1024)[0]
    template = encode_rows(tokenizer(name, "template"), [prompt], RESPONSES[:1], LONG, 1024)[0]
    assert template.prompt_ids == default.prompt_ids
    assert template.response_ids[: len(default.response_ids)] == default.response_ids
    assert family_tokenizer(name).convert_ids_to_tokens(list(template.response_ids[len(default.response_ids):])) == [
        "Ċ" if t == "\n" else t for t in extra]


def test_the_setting_lives_on_the_tokenizer_and_is_checked():
    tok = family_tokenizer("chatml")
    assert not hasattr(tok, TURN_END_ATTRIBUTE)
    encode_response(tok, "x")
    assert getattr(tok, TURN_END_ATTRIBUTE) == find_turn_end(tok)  # found once, then kept on the tokenizer
    with pytest.raises(ValueError, match="data.response_suffix='trl'"):
        set_response_suffix(tok, "trl")
    for value in RESPONSE_SUFFIXES:
        assert response_suffix_problems({"response_suffix": value}) == []
    assert response_suffix_problems({}) == []  # absent: the default
    for bad in ("trl", None, 1):
        (problem,) = response_suffix_problems({"response_suffix": bad})
        assert problem.startswith(f"data.response_suffix={bad}: expected one of end_of_turn, template")


def test_truncation_is_counted_and_warned(caplog):
    """What data.max_prompt_length and data.max_length cut is counted (rows and tokens) and a WARNING names it."""
    tok = tiny_tokenizer()  # one token per byte
    prompts = [[{"role": "user", "content": "x" * 200}], [{"role": "user", "content": "short"}]]
    responses = ["y" * 300, "ok"]
    rows = encode_rows(tok, prompts, responses, max_length=256, max_prompt_length=64)
    full = [len(encode_prompt(tok, p)) for p in prompts]
    counts = truncation_counts(rows)
    assert counts["rows"] == 2 and counts["prompts_cut"] == 1 and counts["prompt_tokens_cut"] == full[0] - 64
    assert counts["responses_cut"] == 1 and counts["response_tokens_cut"] == rows[0].response_cut > 0
    assert add_truncation_counts(counts, counts)["prompt_tokens_cut"] == 2 * counts["prompt_tokens_cut"]
    with caplog.at_level("WARNING", logger="mipo.data.encoding"):
        warn_truncation(counts, "scoring the test rows")
        warn_truncation(truncation_counts(rows[1:]), "the short row")
    assert "scoring the test rows: the truncation rule cut 1 of 2 prompts" in caplog.text
    assert "the short row" not in caplog.text  # nothing cut: no warning
