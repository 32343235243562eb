"""If-Match syntax (RFC 9110 section 13.1.1) on both databases.

`*` or a comma-separated list of entity tags; ours are the version in ASCII
decimal. A well-formed tag that is not ours matches nothing (412 where the job
exists); anything else is 422 with a detail showing the expected form.
"""

import uuid

import pytest
from fastapi.exceptions import RequestValidationError

from http_plumbing import parse_if_match as _parse_if_match


def create(client) -> dict:
    response = client.post("/extraction-jobs", json={"document_id": "d"})
    assert response.status_code == 201, response.text
    return response.json()


def job_at_version_3(client) -> str:
    url = f"/extraction-jobs/{create(client)['id']}"
    client.patch(url, json={"status": "processing"})
    client.patch(url, json={"status": "pending"})
    assert client.get(url).headers["etag"] == '"3"'
    return url


# --- the parser on its own ------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "versions"),
    [
        ([], None),
        (["*"], None),
        ([" * "], None),
        (['"3"'], {3}),
        (['"7", "3"'], {3, 7}),
        (['"7" ,\t"3"'], {3, 7}),
        ([',, "3" ,'], {3}),  # RFC 9110 5.6.1.2: empty list elements are allowed
        (['"7"', '"3"'], {3, 7}),  # several field lines are one list
        (['W/"3"'], set()),  # If-Match compares strongly: weak tags never match
        (['"03"'], set()),  # not ours: ours have no leading zero
        (['"0"'], set()),
        (['"1,2"'], set()),  # one tag; a comma is an etagc
        (['""'], set()),
        (['"one"'], set()),
        (['"-1"'], set()),
        (['"\u00c2\u00b2"'], set()),  # "²" in UTF-8, as Latin-1 decoding sees it
        (['"\u00b2"'], set()),  # the Unicode digit itself (obs-text)
        (['"\u0663"'], set()),  # ARABIC-INDIC DIGIT THREE: isdigit(), not ours
        (['"' + "9" * 19 + '"'], set()),  # beyond BIGINT: never a version
        (['"9223372036854775807"'], {2**63 - 1}),
        (['"9223372036854775808"'], set()),
        (['"' + "9" * 20 + '"'], set()),
        (['"' + "7" * 5000 + '"'], set()),
        (['"3", W/"4", "x"'], {3}),
    ],
)
def test_well_formed_values(lines, versions):
    parsed = _parse_if_match(lines)
    assert parsed == (None if versions is None else frozenset(versions))


@pytest.mark.parametrize(
    "lines",
    [
        ["3"],
        [""],
        [" "],
        [","],
        ["'3'"],
        ['"3'],
        ['3"'],
        ['"3" "4"'],
        ['"3";4'],
        ['w/"3"'],  # "W/" is case-sensitive
        ['W/ "3"'],
        ['"3 "'],  # a space is not an etagc
        ['"3\t"'],
        ['"a"b"'],
        ['"\x00"'],
        ['"\x7f"'],
        ['"3"\n'],
        ['*, "3"'],
        ["*", "*"],
        ['"3"', "3"],
        ["garbage"],
    ],
)
def test_malformed_values_are_refused(lines):
    with pytest.raises(RequestValidationError) as raised:
        _parse_if_match(lines)
    (error,) = raised.value.errors()
    assert error["loc"] == ("header", "If-Match")
    assert 'If-Match: "3"' in error["msg"]


# --- over HTTP, on both databases -----------------------------------------------


def test_unquoted_version_is_422_showing_the_quoted_form(client):
    url = job_at_version_3(client)
    before = client.get(url).json()
    response = client.patch(url, json={"status": "failed"}, headers={"If-Match": "3"})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["header", "If-Match"]
    assert '"3"' in error["msg"]
    assert "version is 3" not in response.text
    assert client.get(url).json() == before


@pytest.mark.parametrize(
    "value",
    [
        '"\u00b2"'.encode(),  # UTF-8 on the wire: two obs-text bytes
        '"\u00b2"'.encode("latin-1"),  # one obs-text byte
        '"\u0663"'.encode(),
        ('"' + "3" * 5000 + '"').encode(),
        b'"03"',
        b'W/"3"',
        b'"3,"',
        b'"9223372036854775808"',
        b'"' + b"9" * 19 + b'"',
    ],
    ids=["superscript-utf8", "superscript-latin1", "arabic-3", "5000-digits", "03"]
    + ["weak", "comma-inside", "2**63", "19-nines"],
)
def test_well_formed_tag_that_is_not_ours_is_412(client, value, caplog):
    url = job_at_version_3(client)
    before = client.get(url).json()
    response = client.patch(url, json={"status": "failed"}, headers={"If-Match": value})
    assert response.status_code == 412, response.text
    assert "version is 3" in response.json()["detail"]
    assert client.get(url).json() == before
    assert "unhandled" not in caplog.text


def test_matching_tag_among_others_and_across_field_lines(client):
    url = job_at_version_3(client)
    response = client.patch(
        url,
        json={"status": "processing"},
        headers=[("If-Match", '"9"'), ("If-Match", 'W/"3", "3"')],
    )
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == '"4"'


def test_malformed_if_match_on_unknown_job_is_422_and_well_formed_is_404(client):
    url = f"/extraction-jobs/{uuid.uuid4()}"
    body = {"status": "failed"}
    assert client.patch(url, json=body, headers={"If-Match": "1"}).status_code == 422
    assert client.patch(url, json=body, headers={"If-Match": '"1"'}).status_code == 404
