"""Ray Data on a real local cluster: SmolVLMPredictor in `map_batches` and `smolvlm run-batch --ray` give the answers
of the single-process run."""

from __future__ import annotations

import json

import pytest
from batch_jobs import CONTEXT, MAX_IMAGE_PIXELS, NEW_TOKENS, answers, run_batch

ray = pytest.importorskip("ray")  # the test extra installs it (smolvlm[ray])


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_run_batch_on_ray_equals_the_local_run(cluster, tiny_v2, requests_file, clean_run, tmp_path):
    unique = tmp_path / "requests.jsonl"  # without the last line, which repeats a custom_id (Ray answers both)
    unique.write_text("\n".join(requests_file[0].read_text().splitlines()[:-1]) + "\n")
    out = tmp_path / "results.jsonl"
    done = run_batch(tiny_v2, "-i", str(unique), "-o", str(out), "--ray", cluster)
    assert done.returncode == 7, done.stderr
    rows = [json.loads(raw) for part in sorted(out.iterdir()) for raw in part.read_text().splitlines()]
    records = [json.loads(row["response"]) for row in rows]
    assert [row["text"] for row in rows] == [r["response"]["body"]["choices"][0]["message"]["content"]
                                             if r["error"] is None else None for r in records]

    def by_custom_id(lines):  # (the lines without a custom_id are numbered by position in an actor's batch)
        return {k: v for k, v in answers(lines).items() if not k.startswith("line:")}

    assert by_custom_id(records) == by_custom_id(clean_run[1]) and len(records) == len(clean_run[1])
    assert sum(r["error"] is not None for r in records) == 7


def test_predictor_in_map_batches_answers_image_bytes_like_the_local_run(cluster, tiny_v2, photos, tmp_path):
    from smolvlm.batch.ray import SmolVLMPredictor
    from smolvlm.serving.limits import Limits

    files = [str(photos / f"p{i}.png") for i in range(4)] + [str(photos / "big.png")]
    local = tmp_path / "local.jsonl"
    run_batch(tiny_v2, "--images", *files, "--prompt", "Describe.", "--max-new-tokens", str(NEW_TOKENS),
              "-o", str(local))
    expected = {r["custom_id"]: r for r in map(json.loads, local.read_text().splitlines())}
    ds = ray.data.read_binary_files(files, include_paths=True)
    ds = ds.map_batches(SmolVLMPredictor, concurrency=1, batch_size=3, fn_constructor_kwargs=dict(
        model=str(tiny_v2), prompt="Describe.", fields={"max_tokens": NEW_TOKENS}, max_batch=4,
        max_model_len=CONTEXT, limits=Limits(max_image_pixels=MAX_IMAGE_PIXELS)))
    rows = {row["custom_id"]: row for row in ds.take_all()}
    assert set(rows) == set(expected)
    for path, row in rows.items():
        local_line = expected[path]
        if local_line["error"] is None:
            assert row["text"] == local_line["response"]["body"]["choices"][0]["message"]["content"] and row["text"]
            assert row["error"] is None and row["status_code"] == 200
        else:
            assert "--max-image-pixels" in row["error"] and row["status_code"] == 400
