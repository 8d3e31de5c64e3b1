"""Full text: multilingual matching, phrase and prefix queries, ranking, snippets, query safety."""

from __future__ import annotations

import dataclasses

import pytest

from datamesh.core.errors import ValidationError
from datamesh.storage.index import SearchIndex
from tests.index.conftest import make_doc

SENTENCES = {
    "de": "Die Straßenbahn fährt über die Brücke nach Köln.",
    "fr": "Le garçon a mangé une crème brûlée à côté de l'église.",
    "ja": "東京タワーは日本で一番有名な電波塔です。",
    "zh": "北京是中华人民共和国的首都。",
    "ru": "Москва является столицей Российской Федерации.",
    "ar": "القاهرة هي عاصمة جمهورية مصر العربية.",
    "th": "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "en": "The quick brown fox jumps over the lazy dog.",
}

QUERIES = [
    ("de", "Brücke"),
    ("de", "brucke"),  # accents and case folded
    ("de", "KÖLN"),
    ("fr", "creme brulee"),
    ("fr", "église"),
    ("ja", "東京"),  # a word inside an unspaced sentence
    ("ja", "電波塔"),
    ("ja", "有名"),
    ("zh", "首都"),
    ("zh", "人民"),
    ("ru", "столицей"),
    ("ru", "москва"),
    ("ar", "القاهرة"),
    ("ar", "مصر"),
    ("th", "ประเทศไทย"),
    ("en", "fox"),
]


@pytest.fixture
def multilingual(index: SearchIndex) -> dict[str, str]:
    docs = {lang: make_doc(f"question in {lang}", text) for lang, text in SENTENCES.items()}
    assert index.add_many(list(docs.values())).unwrap() == len(docs)
    return {lang: str(doc.turn_id) for lang, doc in docs.items()}


@pytest.mark.parametrize(("lang", "query"), QUERIES)
def test_non_english_words_are_found(index: SearchIndex, multilingual: dict[str, str], lang: str, query: str) -> None:
    # Given one sentence per language, When searching a word of one of them
    hits = index.search(query, tenant="acme").unwrap()
    # Then exactly that sentence is found
    assert [str(h.turn_id) for h in hits] == [multilingual[lang]]


def test_snippet_marks_the_match_and_keeps_cjk_unspaced(index: SearchIndex, multilingual: dict[str, str]) -> None:
    hits = index.search("東京", tenant="acme").unwrap()
    assert "[東京]タワー" in hits[0].snippet.replace("][", "")
    assert "\ue000" not in hits[0].snippet


def test_phrase_query_needs_adjacent_words_in_order(index: SearchIndex) -> None:
    index.add_many([make_doc("p", "red apple green pear"), make_doc("p", "green apple red pear")]).unwrap()
    assert len(index.search('"red apple"', tenant="acme").unwrap()) == 1
    assert len(index.search("red apple", tenant="acme").unwrap()) == 2
    assert index.search('"apple red green"', tenant="acme").unwrap() == []


def test_prefix_query(index: SearchIndex) -> None:
    index.add_many([make_doc("p", "internationalisation matters"), make_doc("p", "international law")]).unwrap()
    assert len(index.search("internation*", tenant="acme").unwrap()) == 2
    assert len(index.search("internationalis*", tenant="acme").unwrap()) == 1
    assert index.search("internation", tenant="acme").unwrap() == []


def test_ranking_prefers_more_relevant_documents(index: SearchIndex) -> None:
    # Given a document dense in the term and one that mentions it once in a long text
    dense = make_doc("python", "python python snakes and python code")
    sparse = make_doc("animals", "a long text about many animals " * 20 + "and one python")
    index.add_many([sparse, dense]).unwrap()
    hits = index.search("python", tenant="acme").unwrap()
    # Then the dense one ranks first, scores descend
    assert [h.turn_id for h in hits] == [dense.turn_id, sparse.turn_id]
    assert hits[0].score > hits[1].score


def test_fts_syntax_in_queries_is_literal(index: SearchIndex) -> None:
    index.add_many([make_doc("p", "NEAR AND OR NOT col:umn")]).unwrap()
    for query in ["NEAR(", "AND", "col:umn", 'a"b', "(x OR", "^start"]:
        assert index.search(query, tenant="acme").is_ok(), query


def test_query_without_searchable_characters_is_a_validation_error(index: SearchIndex) -> None:
    result = index.search('  " ** ', tenant="acme")
    assert isinstance(result.error, ValidationError)
    assert result.error.field == "text"


def test_indexing_a_turn_again_replaces_it(index: SearchIndex) -> None:
    # Given a turn indexed once
    first = make_doc("zebra crossing", "an old answer")
    assert index.add_many([first]).unwrap() == 1
    # When it is indexed again with new text, twice in one call (an outbox row redone)
    again = dataclasses.replace(first, response="a new answer about giraffes")
    index.add_many([again, dataclasses.replace(again, response="the newest answer about okapis")]).unwrap()
    # Then one document remains, with the last text only
    assert index.count().unwrap() == 1
    assert [str(h.turn_id) for h in index.search("okapis", tenant="acme").unwrap()] == [str(first.turn_id)]
    assert index.search("giraffes", tenant="acme").unwrap() == []
    assert index.search("old", tenant="acme").unwrap() == []


def test_segment_leaves_ascii_alone_and_marks_unspaced_scripts() -> None:
    from datamesh.storage.index.text_query import SEGMENT_MARK, segment

    plain = "The quick brown fox, 42 times."
    assert segment(plain) is plain  # the ASCII fast path: nothing to mark
    m = SEGMENT_MARK
    assert segment("東京 café" + m) == f"{m}東{m}{m}京{m} café "  # a stray mark in the input becomes a space
