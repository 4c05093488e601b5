"""Structured output through the Python API (json_schema= dict or pydantic class, regex=, choices=) and the CLI
(--json-schema, --regex, --choice), on the fused CPU model, int8 and bf16 (a random-weight model writes garbage
unless constrained)."""

import json
import re
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field

import smolvlm
from smolvlm.errors import InputError
from test_cli import run


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=30)
    kind: Literal["cat", "dog"]
    toys: list[Literal["ball", "rope", "bone"]] = Field(max_length=3)


SCHEMA = Pet.model_json_schema()
PATTERN = r"[A-Z]{2}[0-9]{3}( [a-z]{1,4})?"


@pytest.fixture(scope="module", params=[dict(), dict(quantize="int8"), dict(dtype="bfloat16")],
                ids=["fp32", "int8", "bf16"])
def vlm(tiny_v2, request):
    return smolvlm.load(tiny_v2, progress=False, **request.param)


def test_pydantic_class_gives_validated_instances(vlm):
    pets = vlm.generate([f"Describe pet {i}." for i in range(12)], json_schema=Pet, temperature=1.0, seed=3,
                        max_new_tokens=120)
    assert all(isinstance(p, Pet) for p in pets) and len({p.model_dump_json() for p in pets}) > 1
    assert isinstance(vlm.generate("Describe a pet.", json_schema=Pet, max_new_tokens=120), Pet)  # greedy


def test_dict_schema_regex_and_choices(vlm):
    for seed in range(4):
        text = vlm.generate("A pet?", json_schema=SCHEMA, temperature=1.0, seed=seed, max_new_tokens=120)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert re.fullmatch(PATTERN, vlm.generate("Code?", regex=PATTERN, temperature=1.0, seed=seed))
        assert vlm.generate("Color?", choices=["red", "dark blue"], temperature=1.0, seed=seed) in ("red", "dark blue")


def test_stream_and_complete_with_a_constraint(vlm):
    pieces = list(vlm.stream("A pet?", json_schema=SCHEMA, temperature=1.0, seed=1, max_new_tokens=120))
    assert len(pieces) > 2
    result = vlm.complete("A pet?", json_schema=SCHEMA, temperature=1.0, seed=1, max_new_tokens=120)
    assert "".join(pieces) == result.text and result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), SCHEMA)


def test_constraint_errors(vlm):
    with pytest.raises(InputError, match="cut at 4 tokens"):
        vlm.generate("A pet?", json_schema=Pet, max_new_tokens=4)
    with pytest.raises(InputError, match="Give one constraint, not regex and choices"):
        vlm.generate("A pet?", regex="a", choices=["a"])
    with pytest.raises(InputError, match="Can't compile the regex"):
        vlm.generate("A pet?", regex="(")
    assert not (vlm.engine and vlm.engine.has_unfinished()) and not vlm.unread


def test_cli_constraints(tiny_v2, tmp_path):
    schema = tmp_path / "pet.json"
    schema.write_text(json.dumps(SCHEMA))
    common = ["--model", tiny_v2, "--temperature", "1.0", "--seed", "2", "--max-new-tokens", "120"]
    out = run("generate", *common, "--json-schema", schema, "Describe a pet.")
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), SCHEMA)
    out = run("generate", *common, "--choice", "yes", "--choice", "no way", "Well?")
    assert out.returncode == 0 and out.stdout in ("yes\n", "no way\n"), out.stderr
    out = run("generate", *common, "--regex", PATTERN, "Code?")
    assert out.returncode == 0 and re.fullmatch(PATTERN, out.stdout.rstrip("\n")), out.stderr
    schema.write_text("{nope")
    out = run("generate", *common, "--json-schema", schema, "Describe a pet.")
    assert out.returncode == 1 and f"--json-schema {schema}: not valid JSON" in out.stderr
    assert "Traceback" not in out.stderr
