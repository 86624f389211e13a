"""The spec language: normalisation, hashing, and every SpecError case (DESIGN §2, §7)."""

import pytest

import gspngen
from gspngen import Spec, SpecError

BASE = {"name": "t"}


def test_defaults_filled_and_normalised():
    d = Spec.from_dict(BASE).to_dict()
    assert d == {
        "name": "t", "connection": 3, "directions": ["lr", "rl", "tb", "bt"], "normalization": "stability",
        "weight_groups": "channel", "chunk": None, "modulation": True, "skip": True, "merge": "learned",
        "layout": "nchw", "precision": ["fp32", "bf16"], "backends": ["cuda", "triton", "cpu"],
    }


def test_hash_stable_and_sensitive():
    a = Spec.from_dict({"name": "t", "precision": ["bf16", "fp32"], "connection": 3})
    b = Spec.from_dict({"connection": 3, "name": "t", "precision": ["fp32", "bf16"]})
    assert a.hash == b.hash and len(a.hash) == 64
    assert Spec.from_dict({"name": "t", "connection": 5}).hash != a.hash
    # order of directions is the D axis order, so it is part of the identity
    assert Spec.from_dict({"name": "t", "directions": ["rl", "lr"]}).hash != \
        Spec.from_dict({"name": "t", "directions": ["lr", "rl"]}).hash
    assert Spec.from_dict({"name": "t", "weight_groups": 1}) == Spec.from_dict({"name": "t", "weight_groups": "shared"})


def test_yaml_roundtrip(tmp_path):
    s = Spec.from_dict({"name": "t", "chunk": 4, "weight_groups": 2, "layout": "nhwc"})
    p = tmp_path / "s.yaml"
    p.write_text(s.to_yaml())
    assert gspngen.load_spec(p) == s


def test_groups():
    assert Spec.from_dict(BASE).groups(8) == 8
    assert Spec.from_dict({"name": "t", "weight_groups": "shared"}).groups(8) == 1
    assert Spec.from_dict({"name": "t", "weight_groups": 4}).groups(8) == 4


BAD = [
    ({}, "name"),
    ({"name": "Bad"}, "name"),
    ({"name": "1x"}, "name"),
    ({"name": "a" * 65}, "name"),
    ({"name": "x; import os"}, "name"),
    ({"name": 3}, "name"),
    ({"name": "t", "connection": 4}, "connection"),
    ({"name": "t", "connection": 11}, "connection"),
    ({"name": "t", "connection": -1}, "connection"),
    ({"name": "t", "connection": True}, "connection"),
    ({"name": "t", "connection": "3"}, "connection"),
    ({"name": "t", "connection": 3.0}, "connection"),
    ({"name": "t", "directions": []}, "directions"),
    ({"name": "t", "directions": ["lr", "lr"]}, "directions"),
    ({"name": "t", "directions": ["up"]}, "directions"),
    ({"name": "t", "directions": "lr"}, "directions"),
    ({"name": "t", "normalization": "l2"}, "normalization"),
    ({"name": "t", "normalization": None}, "normalization"),
    ({"name": "t", "weight_groups": 0}, "weight_groups"),
    ({"name": "t", "weight_groups": "some"}, "weight_groups"),
    ({"name": "t", "weight_groups": 2.5}, "weight_groups"),
    ({"name": "t", "weight_groups": False}, "weight_groups"),
    ({"name": "t", "chunk": 0}, "chunk"),
    ({"name": "t", "chunk": "8"}, "chunk"),
    ({"name": "t", "chunk": True}, "chunk"),
    ({"name": "t", "modulation": "yes"}, "modulation"),
    ({"name": "t", "skip": 1}, "skip"),
    ({"name": "t", "merge": "max"}, "merge"),
    ({"name": "t", "layout": "chw"}, "layout"),
    ({"name": "t", "precision": []}, "precision"),
    ({"name": "t", "precision": ["fp64"]}, "precision"),
    ({"name": "t", "precision": ["fp32", "fp32"]}, "precision"),
    ({"name": "t", "backends": ["metal"]}, "backends"),
    ({"name": "t", "backends": "cuda"}, "backends"),
    ({"name": "t", "colour": "red"}, "colour"),
]


@pytest.mark.parametrize("data,field", BAD)
def test_spec_errors_name_field_value_and_allowed(data, field):
    with pytest.raises(SpecError) as info:
        Spec.from_dict(data)
    err = info.value
    assert err.field == field
    msg = str(err)
    assert f"'{field}'" in msg and "expected" in msg and "got" in msg
    if field in data:
        assert repr(data[field])[:20] in msg


def test_direct_construction_is_validated():
    with pytest.raises(SpecError):
        Spec(name="t", connection=2)


@pytest.mark.parametrize("text,line", [("name: t\nconnection: [3\n", 2), ("name: t\n  bad: : x\n", 2), ("a: b: c", 1)])
def test_yaml_syntax_error_has_line(text, line):
    with pytest.raises(SpecError) as info:
        Spec.from_yaml(text)
    assert info.value.field == "<yaml>" and info.value.line == line and f"line {line}" in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_non_mapping_document(text):
    with pytest.raises(SpecError) as info:
        Spec.from_yaml(text)
    assert info.value.field == "<document>" and "mapping" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as info:
        gspngen.load_spec(tmp_path / "nope.yaml")
    assert info.value.field == "<file>"


def test_examples_load():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "examples"
    names = {gspngen.load_spec(p).name for p in root.glob("*.yaml")}
    assert {"gspn4", "gspn2_compact", "local8", "wide5"} <= names


def test_error_message_stays_short_for_huge_values():
    """A few hundred bytes of YAML aliases expand to millions of list items: the message must not."""
    levels = ['- &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    levels += [f"- &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 8)]
    text = "name: t\ndirections:\n" + "\n".join("  " + line for line in levels) + "\n"
    with pytest.raises(SpecError) as info:
        Spec.from_yaml(text)
    assert info.value.field == "directions" and len(str(info.value)) < 1000


def test_deeply_nested_yaml_is_a_spec_error():
    with pytest.raises(SpecError) as info:
        Spec.from_yaml("name: t\ndirections: " + "[" * 1000 + "]" * 1000 + "\n")
    assert info.value.field == "<yaml>"


def test_binary_file_is_a_spec_error(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_bytes(b"name: t\n\xff\xfe\x00garbage")
    with pytest.raises(SpecError) as info:
        gspngen.load_spec(p)
    assert info.value.field == "<file>" and "UTF-8" in str(info.value)


def test_duplicate_field_is_an_error():
    with pytest.raises(SpecError) as info:
        Spec.from_yaml("name: t\nconnection: 3\nconnection: 5\n")
    assert info.value.field == "connection" and info.value.line == 3 and "line 2" in str(info.value)


@pytest.mark.parametrize("field", ["chunk", "weight_groups"])
def test_integers_fit_the_kernels_int32_arguments(field):
    assert getattr(Spec.from_dict({"name": "t", field: 2**31 - 1}), field) == 2**31 - 1
    with pytest.raises(SpecError) as info:
        Spec.from_dict({"name": "t", field: 2**31})
    assert info.value.field == field and "2147483647" in str(info.value)


def test_subclasses_of_str_and_int_are_not_accepted():
    """A str/int subclass could bring its own __str__/__format__ into generated code."""

    class Sly(str):
        def __str__(self):
            return "t; import os"

        __format__ = lambda self, spec: str(self)  # noqa: E731

    class Num(int):
        def __repr__(self):
            return "3; import os"

    for data, field in [({"name": Sly("t")}, "name"), ({"name": "t", "connection": Num(3)}, "connection"),
                        ({"name": "t", "chunk": Num(4)}, "chunk"), ({"name": "t", "merge": Sly("sum")}, "merge"),
                        ({"name": "t", "directions": [Sly("lr")]}, "directions")]:
        with pytest.raises(SpecError) as info:
            Spec.from_dict(data)
        assert info.value.field == field


@pytest.mark.parametrize("key,close", [("conection", "connection"), ("normalisation", "normalization"),
                                       ("weight_group", "weight_groups"), ("directoins", "directions")])
def test_unknown_field_suggests_the_close_one(key, close):
    with pytest.raises(SpecError, match=rf"did you mean '{close}'\?"):
        Spec.from_dict({"name": "a", key: 3})


def test_unknown_field_far_from_any_gets_no_guess():
    with pytest.raises(SpecError) as info:
        Spec.from_dict({"name": "a", "zzzz": 3})
    assert "did you mean" not in str(info.value) and "known fields: name, connection" in str(info.value)


@pytest.mark.parametrize("text,line", [
    ("name: a\nconnection: [3\ndirections: [lr]\n", 2),  # unclosed '[' noticed on line 3
    ('name: a\nmerge: "sum\nskip: true\n', 2),  # unclosed quote noticed at the end
    ("name: a\nconnection: {3\n\n\nskip: true\n", 2),
])
def test_yaml_error_points_at_the_line_to_fix(text, line):
    with pytest.raises(SpecError) as info:
        Spec.from_yaml(text)
    assert info.value.line == line and f"(line {line})" in str(info.value)
    assert "not closed" in str(info.value)
