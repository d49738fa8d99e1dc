from __future__ import annotations

import io
import re
import tarfile

import pytest

from cpet.data.brown import brown_text, interleave_genres, load_brown, parse_brown_document
from cpet.data.corpora import load_corpus
from tests.conftest import real_asset

TAGGED = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n\n\n"
    "\tIt/pps did/dod n't/* ,/, however/rb ,/, end/vb (/( yet/rb )/) ;/. Atlanta's/np$ vote/nn ?/.\n"
)


def test_parse_strips_tags_and_detokenises():
    assert parse_brown_document(TAGGED) == (
        'The jury said "no evidence" was found. It didn\'t, however, end (yet); Atlanta\'s vote?')


def make_archive(path, docs: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in {**docs, "package.json": "{}"}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def fixture_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("CPET_CACHE", str(tmp_path / "cache"))
    docs = {f"ca{i:02d}": f"Press/nn story/nn {i}/cd ./." for i in range(1, 13)}
    docs.update({f"cr{i:02d}": f"Funny/jj tale/nn {i}/cd !/." for i in range(1, 4)})
    path = tmp_path / "brown.tgz"
    make_archive(path, docs)
    return path


def test_split_by_document_is_deterministic_and_covers_genres(fixture_archive):
    held = load_brown("heldout", fixture_archive)
    train = load_brown("train", fixture_archive)
    assert [d.doc_id for d in held] == ["ca01", "ca11", "cr01"]  # every 10th document per genre
    assert len(train) == 12 and not {d.doc_id for d in held} & {d.doc_id for d in train}
    assert {d.genre for d in held} == {"press: reportage", "humor"}
    assert load_brown("heldout", fixture_archive) == held
    assert held[0].text == "Press story 1."
    import cpet.data.brown
    from cpet.data.brown import PARSER_VERSION

    # the second call reads the parsed cache, named by the parser's version: proven by a parser that fails
    (cache,) = (fixture_archive.parent / "cache" / "data").glob(f"brown-*-v{PARSER_VERSION}.jsonl")
    parse = cpet.data.brown._parse_archive
    cpet.data.brown._parse_archive = lambda archive: pytest.fail("parsed again")
    try:
        assert load_brown("heldout", fixture_archive) == held
    finally:
        cpet.data.brown._parse_archive = parse
    # a cache changed since it was written (cut short, edited) is not read as it stands: it is parsed again
    # (a Brown cache cut to 400 lines gave 400 of the 500 documents, without a word)
    for damage in (lambda text: text.replace("Press story 1.", "Edited in the cache."),
                   lambda text: "".join(text.splitlines(keepends=True)[:-3])):
        cache.write_text(damage(cache.read_text()))
        assert load_brown("heldout", fixture_archive) == held and len(load_brown("all", fixture_archive)) == 15


def test_interleaving_mixes_genres_in_any_prefix(fixture_archive):
    order = [d.genre_code for d in interleave_genres(load_brown("all", fixture_archive))]
    assert order[:6] == ["a", "r", "a", "r", "a", "r"]
    assert brown_text("heldout", archive=fixture_archive).split("\n\n")[:2] == ["Press story 1.", "Funny tale 1!"]


def test_bad_split_and_empty_corpus(tmp_path, fixture_archive):
    with pytest.raises(ValueError, match="unknown Brown split 'dev'"):
        load_brown("dev", fixture_archive)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(str(empty))
    with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
        load_corpus("wiki")
    no_docs = tmp_path / "nodocs.tgz"
    make_archive(no_docs, {})
    with pytest.raises(ValueError, match="holds no Brown documents"):
        load_brown("all", no_docs)


def test_real_brown_corpus():
    archive = real_asset("brown-npm")
    docs = load_brown("all", archive)
    held = load_brown("heldout", archive)
    assert len(docs) == 500
    assert len({d.genre_code for d in docs}) == 15
    assert len(held) == 54 and len({d.genre_code for d in held}) == 15
    words = sum(len(d.text.split()) for d in docs)
    assert 1_000_000 < words < 1_050_000
    tag_remnants = sum(len(re.findall(r"\w/(?:at|nn|vbd|in|jj)\b", d.text)) for d in docs)
    assert tag_remnants == 0
    assert docs[0].text.startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's")
