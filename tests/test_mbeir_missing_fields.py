"""An M-BEIR record without a required field is reported as missing, naming file and line."""

import json

import pytest
from test_mbeir import GOOD, OVEN_POOL, QUERY_FILE, root, write_jsonl  # noqa: F401 (fixture)

from jfe_jax.data.mbeir import MBEIR

POOL_FILE = "cand_pool/local/mbeir_oven_task6_cand_pool.jsonl"


def _without(record, field):
    return json.dumps({k: v for k, v in record.items() if k != field})


@pytest.mark.parametrize("field", ["pos_cand_list", "query_modality"])
def test_query_without_a_required_field_says_it_is_missing(root, field):  # noqa: F811
    write_jsonl(root / QUERY_FILE, [GOOD, _without(GOOD, field)])
    with pytest.raises(ValueError) as error:
        MBEIR(root).read_queries("test", "mscoco_task0")
    assert str(error.value) == (
        f"{QUERY_FILE}:2: query {GOOD['qid']} has no {field} (the field is missing)"
    )


def test_candidate_with_a_null_modality_says_so(root):  # noqa: F811
    write_jsonl(root / POOL_FILE, [OVEN_POOL[1], json.dumps({**OVEN_POOL[0], "modality": None})])
    with pytest.raises(ValueError) as error:
        list(MBEIR(root).iter_local_pool("oven_task6"))
    assert str(error.value) == (
        f"{POOL_FILE}:2: candidate {OVEN_POOL[0]['did']} has no modality (the field is null)"
    )
