"""The optional `images` column of rollout shards: written only when rows have images, read back as bytes, absent
from text-only shards (which stay byte-for-byte what they were), and text and image shards of one iteration read
together (null images for the text rows); column shards fill image shards as any other."""

from __future__ import annotations

import pyarrow as pa
import pytest

from hpc_rlhf.rollouts import (
    ROLLOUT_SCHEMA,
    RolloutReader,
    RolloutValidationError,
    ShardWriter,
    commit_iteration,
    generator_shard_name,
    to_rollout_table,
)
from hpc_rlhf.rollouts.reader import read_shard_file
from hpc_rlhf.rollouts.schema import IMAGES_FIELD, SchemaMismatchError, check_file_schema


def test_image_shards_and_text_shards_read_together(run_dir, make_rows):
    text_rows = make_rows(groups=2, group_size=2, seed=1)
    image_rows = make_rows(groups=2, group_size=2, first_group=2, seed=2)
    for k, row in enumerate(image_rows):
        row["images"] = [bytes([k, 0, 255]), b"\x89PNG second"] if k % 2 == 0 else None  # null: a text prompt
    writer = ShardWriter(run_dir)
    text_path = writer.write(0, generator_shard_name(0), text_rows)
    image_path = writer.write(0, generator_shard_name(1), image_rows)
    commit_iteration(run_dir, 0, [generator_shard_name(0), generator_shard_name(1)])

    text_schema = pa.ipc.open_file(pa.memory_map(str(text_path))).schema
    assert text_schema.equals(ROLLOUT_SCHEMA, check_metadata=True)  # text-only shards: the schema they always had
    image_schema = pa.ipc.open_file(pa.memory_map(str(image_path))).schema
    assert image_schema.names == ROLLOUT_SCHEMA.names + ["images"]
    assert image_schema.field("images").type == pa.list_(pa.binary())

    table = RolloutReader(run_dir).read(0)
    by_group = {(r["group_id"], r["sample_index"]): r["images"] for r in table.to_pylist()}
    assert [by_group[(g, s)] for g in (0, 1) for s in (0, 1)] == [None] * 4
    assert by_group[(2, 0)] == [bytes([0, 0, 255]), b"\x89PNG second"] and by_group[(2, 1)] is None
    assert by_group[(3, 0)] == [bytes([2, 0, 255]), b"\x89PNG second"]

    # Column shards fill an image shard like any other; the images stay.
    writer.write_columns(0, generator_shard_name(1), "rewards", {"reward": [1.0] * 4, "score": [1.0] * 4})
    filled = RolloutReader(run_dir).read_shard(0, generator_shard_name(1))
    assert filled.column("reward").to_pylist() == [1.0] * 4
    assert filled.column("images").to_pylist()[0] == [bytes([0, 0, 255]), b"\x89PNG second"]


def test_the_column_is_checked(run_dir, make_rows):
    rows = make_rows(groups=1, group_size=2)
    bad_type = pa.schema(list(ROLLOUT_SCHEMA) + [pa.field("images", pa.list_(pa.int32()))],
                         metadata=ROLLOUT_SCHEMA.metadata)
    with pytest.raises(SchemaMismatchError, match="column 'images' has type list<item: int32>"):
        check_file_schema(bad_type, "x.arrow")
    check_file_schema(to_rollout_table([dict(rows[1], images=[b"png"])]).schema, "x.arrow")
    assert IMAGES_FIELD.nullable
    # A later batch of a shard cannot add images the first one did not have.
    with pytest.raises(RolloutValidationError, match="images"):
        ShardWriter(run_dir).write_batches(0, "generator_0000", [[rows[1]], [dict(rows[1], images=[b"png"])]])


def test_a_shard_without_images_reads_as_before(run_dir, make_rows):
    rows = make_rows(groups=2, group_size=2)
    path = ShardWriter(run_dir).write(0, generator_shard_name(0), rows)
    table = read_shard_file(path)
    assert "images" not in table.schema.names
