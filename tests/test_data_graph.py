"""Large-Star / Small-Star connected components (pipelines/data/graph.py): the block functions driven the way
Ray Data drives them (hash-partitioned by node into several blocks) must give the components scipy gives."""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.data.components import duplicate_keepers
from pipelines.data.graph import (
    MAX_ROUNDS,
    both_directions,
    large_star,
    larger_to_smaller,
    small_star,
    star_members,
    unsettled_count,
)


def _shuffle(adj: pa.Table, blocks: int) -> list[pd.DataFrame]:
    """What ``repartition(blocks, keys=["node"])`` guarantees: every row of a node in the same block."""
    df = adj.to_pandas()
    part = df["node"].map(lambda s: zlib.crc32(s.encode()) % blocks)
    return [df[part == b].reset_index(drop=True) for b in range(blocks)]


def _components(u, v, blocks: int) -> tuple[pd.DataFrame, int]:
    edges = pd.DataFrame({"u": u, "v": v})
    for rounds in range(MAX_ROUNDS):
        adj = _shuffle(both_directions(pa.Table.from_pandas(edges, preserve_index=False)), blocks)
        if sum(int(unsettled_count(b)["unsettled"][0]) for b in adj) == 0:
            return pd.concat([star_members(b) for b in adj], ignore_index=True), rounds
        large = pd.concat([large_star(b) for b in adj], ignore_index=True)
        oriented = _shuffle(larger_to_smaller(pa.Table.from_pandas(large, preserve_index=False)), blocks)
        edges = pd.concat([small_star(b) for b in oriented], ignore_index=True)
    raise AssertionError("did not converge")


def _as_dict(frame: pd.DataFrame) -> dict:
    return {r.id: (r.keeper, int(r.cluster_size)) for r in frame.itertuples()}


def _names(n: int, rng) -> np.ndarray:
    return np.array([f"doc-{i:05d}" for i in rng.permutation(n)], dtype=object)  # id order != creation order


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("seed", range(6))
def test_random_graphs_match_scipy(seed, blocks):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    names = _names(n, rng)
    m = int(rng.integers(1, 2 * n))
    u, v = names[rng.integers(0, n, m)], names[rng.integers(0, n, m)]
    got, _ = _components(u, v, blocks)
    keep = u != v
    assert _as_dict(got) == _as_dict(duplicate_keepers(u[keep], v[keep]))
    assert not got["id"].duplicated().any()


def test_long_chain_converges_in_few_rounds():
    rng = np.random.default_rng(7)
    names = _names(2000, rng)
    got, rounds = _components(names[:-1], names[1:], blocks=4)  # a path through 2,000 shuffled ids
    assert set(got["keeper"]) == {min(names)}
    assert set(got["cluster_size"]) == {2000}
    assert rounds <= 20


def test_stars_are_settled_at_once_and_self_loops_ignored():
    u = np.array(["b", "c", "d", "x", "q"], dtype=object)
    v = np.array(["a", "a", "a", "y", "q"], dtype=object)
    got, rounds = _components(u, v, blocks=2)
    assert rounds == 0
    assert _as_dict(got) == {"a": ("a", 4), "b": ("a", 4), "c": ("a", 4), "d": ("a", 4),
                             "x": ("x", 2), "y": ("x", 2)}


def test_empty_blocks_give_typed_empty_frames():
    empty = pd.DataFrame({"node": pd.Series([], dtype=object), "nbr": pd.Series([], dtype=object)})
    assert list(large_star(empty).columns) == ["u", "v"]
    assert list(small_star(empty).columns) == ["u", "v"]
    assert list(star_members(empty).columns) == ["id", "keeper", "cluster_size"]
    assert int(unsettled_count(empty)["unsettled"][0]) == 0


@pytest.mark.ray
def test_on_ray_matches_scipy_on_chains_and_random_edges(ray_cluster):
    """The Ray Data driver of the same functions (real hash shuffles, several blocks, several rounds)."""
    import ray

    from pipelines.data.graph import connected_components

    rng = np.random.default_rng(3)
    names = _names(600, rng)
    u = np.concatenate([names[:199], names[200:][rng.integers(0, 400, 300)]])  # a 200-long path + random edges
    v = np.concatenate([names[1:200], names[200:][rng.integers(0, 400, 300)]])
    edges = ray.data.from_arrow([pa.table({"u": part_u, "v": part_v})  # 3 input blocks
                                 for part_u, part_v in zip(np.array_split(u, 3), np.array_split(v, 3))])
    keepers, rounds = connected_components(edges, num_blocks=4)
    keep = u != v
    assert _as_dict(keepers.to_pandas()) == _as_dict(duplicate_keepers(u[keep], v[keep]))
    assert rounds >= 2  # the path needs real iterations, not just the settled check


@pytest.mark.ray
def test_near_dedup_without_any_candidate_marks_nothing(ray_cluster):
    """No LSH candidate at all: Ray Data drops the empty blocks (and with them the schema); the stage must
    still return typed, empty clusters that the marking join accepts."""
    import ray

    from cluster.schemas.data import NearDedupConfig
    from pipelines.data.dedup import mark_near_duplicates, near_duplicate_clusters

    docs = [{"id": f"d{i}", "text": " ".join(f"w{i}x{j}" for j in range(30))} for i in range(6)]
    ds = ray.data.from_items(docs, override_num_blocks=2)
    result = near_duplicate_clusters(ds, NearDedupConfig(), num_blocks=2)
    assert result.stats["candidate_pairs"] == 0 and result.stats["clusters"] == 0
    marked = mark_near_duplicates(ds, result.keepers, num_blocks=2).to_pandas()
    assert sorted(marked["id"]) == [d["id"] for d in docs]
    assert set(marked["duplicate_of"]) == {""} and set(marked["cluster_size"]) == {1}
