"""What every route may assume of client input, checked where it is enforced: the JSON text, model
references, ids that become Redis keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ollm.contract import Keys
from ollm.errors import InvalidReferenceError, InvalidRequestError, ModelNotFoundError
from ollm.references import confined_to, parse_reference
from server.app import ROUTERS
from server.routing import ClientInputRoute, lone_surrogate_at


@pytest.mark.parametrize(
    ("text", "unpaired"),
    [
        ('{"content": "plain"}', None),
        ('{"content": "\\ud83d\\ude00 a pair is one character"}', None),
        ('{"content": "\\\\ud800 is an escaped backslash, then text"}', None),
        ('{"content": "\\ud800 hi"}', 13),
        ('{"content": "hi \\udc00"}', 16),
        ('{"content": "ends high \\uD800"}', 23),
        ('{"content": "\\ud800\\n then a newline"}', 13),
        ('{"a": "\\ud800", "b": "\\udc00"}', 7),
    ],
)
def test_lone_surrogates_are_found_and_pairs_are_not(text: str, unpaired: int | None) -> None:
    assert lone_surrogate_at(text.encode()) == unpaired
    if unpaired is None:
        json.dumps(json.loads(text), ensure_ascii=False).encode()  # really encodable
    else:
        with pytest.raises(UnicodeEncodeError):
            json.dumps(json.loads(text), ensure_ascii=False).encode()


@pytest.mark.parametrize(
    "name",
    ["~s/", "~root/x", "~nosuchuser", "model\x00name", "a\nb", "\ud800", "x" * 5000, "org/" + "n" * 2000],
)
def test_odd_model_names_are_the_clients_mistake(name: str) -> None:
    with pytest.raises((InvalidReferenceError, ModelNotFoundError)):
        parse_reference(name)


def test_only_the_own_home_expands() -> None:
    assert parse_reference("~/some/model").name == str(Path.home() / "some" / "model")


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "/", "~/", "./x", "~/.ollm/redis"])
def test_in_a_request_local_models_must_live_in_models_dir(name: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "mine").mkdir(parents=True)
    with confined_to([models]), pytest.raises(InvalidReferenceError, match="outside"):
        parse_reference(name)
    with confined_to([models]):
        assert parse_reference(str(models / "mine")).name == str(models / "mine")
        # "../" out of models_dir is resolved before it is checked.
        with pytest.raises(InvalidReferenceError):
            parse_reference(str(models / "mine" / ".." / ".." / "elsewhere"))


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "a:b", "a*", "x" * 129, "resp_\x00", "sess id", "é"])
def test_ids_are_checked_before_they_become_redis_keys(bad: str) -> None:
    keys = Keys("ns")
    with pytest.raises(InvalidRequestError):
        keys.response(bad)
    with pytest.raises(InvalidRequestError):
        keys.session(bad)
    assert keys.response("resp_0123abcd") == "ns:response:resp_0123abcd"
    assert keys.session("sess_0123abcd") == "ns:session:sess_0123abcd"


def test_every_route_of_every_family_reads_client_input_the_same_way() -> None:
    # A new family's router must use ClientInputRoute (or a subclass) too.
    routes = [route for router in ROUTERS for route in router.routes]
    assert len(routes) > 25
    assert [getattr(r, "path", r) for r in routes if not isinstance(r, ClientInputRoute)] == []
