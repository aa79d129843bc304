"""The pure side of model uploads: names, descriptions, the journal, what remains."""

from __future__ import annotations

import json

import pytest

from common.digest import segment_digest
from common.errors import Conflict, ModelFormatError, RequestError, ResumeMismatch
from common.uploads import (
    INDEX_NAME,
    SegmentRef,
    check_description,
    check_file_name,
    check_index_matches,
    check_verified,
    describe,
    journal_line,
    parse_journal,
    session_of,
    shard_names,
    upload_todo,
)
from common.wire import UploadDescription, UploadFile

SEG = 10


def _file(name: str, size: int) -> UploadFile:
    count = -(-size // SEG)
    return UploadFile(
        name=name,
        size=size,
        segment_digests=[segment_digest(f"{name}{i}".encode()) for i in range(count)],
    )


def _shards() -> UploadDescription:
    return describe(
        SEG, [_file(INDEX_NAME, 5), _file("a.safetensors", 25), _file("b.safetensors", 10)]
    )


@pytest.mark.parametrize(
    "name", ["model.safetensors", "model-00001-of-00002.safetensors", "w_1+x=y.safetensors"]
)
def test_plain_names_pass(name: str) -> None:
    assert check_file_name(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "is empty"),
        ("../x.safetensors", "path separator"),
        ("a/b.safetensors", "path separator"),
        ("a\\b.safetensors", "path separator"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        (".hidden", "starts with a dot"),
        ("a\nb", "control character"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_names_that_could_leave_the_folder_are_refused(name: str, why: str) -> None:
    with pytest.raises(RequestError, match=why) as err:
        check_file_name(name, field="files.0.name")
    assert err.value.field == "files.0.name"


def test_shard_names_come_from_the_weight_map_once_each_in_order() -> None:
    index = {"weight_map": {"w0": "b.safetensors", "w1": "a.safetensors", "w2": "b.safetensors"}}
    assert shard_names(json.dumps(index), "idx") == ["b.safetensors", "a.safetensors"]


@pytest.mark.parametrize(
    ("index", "error", "words"),
    [
        ({"weight_map": {"w": "../x.safetensors"}}, RequestError, "path separator"),
        ({"weight_map": {"w": "/etc/passwd"}}, RequestError, "path separator"),
        ({"weight_map": {"w": "x.bin"}}, ModelFormatError, "not a .safetensors"),
        ({"weight_map": {}}, ModelFormatError, "weight_map"),
        ([], ModelFormatError, "weight_map"),
        ({"weight_map": {"w": 3}}, ModelFormatError, "not a file name"),
    ],
)
def test_bad_indexes_are_refused(index: object, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        shard_names(json.dumps(index), "idx")


def test_a_description_is_taken_and_names_its_session() -> None:
    desc = _shards()
    assert check_description(desc, SEG) == desc.digest
    single = describe(SEG, [_file("model.safetensors", 3)])
    assert check_description(single, SEG) != desc.digest


def _refusal(desc: UploadDescription, segment_bytes: int = SEG) -> RequestError:
    with pytest.raises(RequestError) as err:
        check_description(desc, segment_bytes)
    return err.value


def test_descriptions_the_server_cannot_take() -> None:
    desc = _shards()
    assert _refusal(desc, 20).field == "segment_bytes"
    assert _refusal(desc.model_copy(update={"digest": "0" * 32})).field == "digest"
    short = desc.files[1].model_copy(update={"segment_digests": ["0" * 16]})
    assert _refusal(describe(SEG, [desc.files[0], short])).field == "files.1.segment_digests"
    twice = describe(SEG, [_file("m.safetensors", 3), _file("m.safetensors", 3)])
    assert "listed twice" in _refusal(twice).message
    bad = describe(SEG, [_file("../m.safetensors", 3)])
    assert _refusal(bad).field == "files.0.name"
    assert _refusal(describe(SEG, [_file("a.bin", 3)])).field == "files"
    assert _refusal(describe(SEG, [_file(INDEX_NAME, 3), _file("a.bin", 3)])).field == "files"
    assert _refusal(describe(SEG, [_file(INDEX_NAME, 3)])).field == "files"


def test_the_index_must_name_only_uploaded_shards() -> None:
    desc = _shards()
    check_index_matches(desc, json.dumps({"weight_map": {"x": "a.safetensors"}}))
    with pytest.raises(ModelFormatError, match=r"'c\.safetensors'"):
        check_index_matches(desc, json.dumps({"weight_map": {"x": "c.safetensors"}}))


def test_journal_counts_only_segments_of_the_description_with_their_digest() -> None:
    desc = _shards()
    a = desc.files[1].segment_digests
    text = (
        journal_line(1, 0, a[0])
        + journal_line(1, 2, a[2])
        + journal_line(1, 1, "f" * 16)  # not the declared digest
        + journal_line(7, 0, a[0])  # no such file
        + journal_line(2, 5, a[0])  # no such segment
        + "garbage\n"
        + journal_line(0, 0, desc.files[0].segment_digests[0])[:-5]  # torn by a crash
    )
    held = parse_journal(text, desc)
    assert held == [{}, {0: a[0], 2: a[2]}, {}]
    session = session_of(desc.digest, desc, held)
    assert not session.complete
    assert upload_todo(desc, session) == [SegmentRef(0, 0), SegmentRef(1, 1), SegmentRef(2, 0)]
    with pytest.raises(Conflict, match="3 of 5 segments missing"):
        check_verified(desc.digest, desc, held)


def test_a_whole_upload_is_verified_and_leaves_nothing_to_send() -> None:
    desc = _shards()
    held = [dict(enumerate(f.segment_digests)) for f in desc.files]
    check_verified(desc.digest, desc, held)
    session = session_of(desc.digest, desc, held)
    assert session.complete and upload_todo(desc, session) == []


def test_a_session_of_another_model_is_not_resumed() -> None:
    desc = _shards()
    other = describe(SEG, [_file("model.safetensors", 30)])
    session = session_of(other.digest, other, [{}])
    with pytest.raises(ResumeMismatch):
        upload_todo(desc, session)
