"""The run message's derived values: made once, never part of its wire form."""

from __future__ import annotations

import uuid

import orjson

from mq_worker.messages import RunMessage, parse_run


def test_the_run_id_as_text_is_made_once_and_is_not_part_of_the_message() -> None:
    run_id = uuid.uuid4()
    run = parse_run(orjson.dumps({"id": str(run_id), "name": None}))
    fresh = parse_run(orjson.dumps({"id": str(run_id), "name": None}))

    assert run.id_text == str(run_id)
    assert run.id_text is run.id_text  # made once
    assert run.display_name == str(run_id)
    # Neither its JSON nor its equality sees the derived text.
    assert "id_text" not in run.model_dump()
    assert "id_text" not in orjson.loads(run.model_dump_json())
    assert run == fresh
    assert RunMessage.model_validate_json(run.model_dump_json()) == run
    assert "id_text" not in RunMessage.model_json_schema()["properties"]
