"""Connected components of the near-duplicate graph on Ray Data: no part of the graph ever reaches the driver.

Why hand-written: Ray Data has no graph algorithms. This is the alternating Large-Star / Small-Star algorithm
(Kiveris et al., "Connected Components in MapReduce and Beyond", SoCC 2014). Each step is one hash shuffle by
node plus a pandas groupby inside each block; the number of rounds is O(log^2 n) and a few on LSH graphs, whose
components are near-stars already. When no node has both a smaller neighbour and a second neighbour, every
component is a star around its smallest id: that id is the keeper (the rule ``duplicate_keepers`` also uses).

Edges are string pairs ``u, v``; an adjacency is ``node, nbr`` with both directions of every edge, shuffled so
that all rows of a node sit in one block (the ``repartition(keys=...)`` guarantee the dedup stages rely on: Ray
2.60 plans a keyed repartition with block splitting disallowed, so a partition stays one block whatever its
size, and ``batch_size=None`` hands that whole block to the function).
"""
from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

MAX_ROUNDS = 64  # far above what O(log^2 n) needs for any corpus; reaching it means a bug, not a big graph


def _no_rows(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})


def _edges(u, v) -> pd.DataFrame:
    return pd.DataFrame({"u": pd.Series(u, dtype=object).to_numpy(), "v": pd.Series(v, dtype=object).to_numpy()})


def both_directions(table: pa.Table) -> pa.Table:
    """Edges ``u, v`` -> adjacency rows ``node, nbr`` in both directions, self-loops dropped."""
    table = table.filter(pc.not_equal(table.column("u"), table.column("v")))
    u, v = table.column("u").combine_chunks(), table.column("v").combine_chunks()
    return pa.table({"node": pa.concat_arrays([u, v]), "nbr": pa.concat_arrays([v, u])})


def larger_to_smaller(table: pa.Table) -> pa.Table:
    """Edges ``u, v`` -> adjacency rows ``node=max, nbr=min`` (the Small-Star orientation)."""
    table = table.filter(pc.not_equal(table.column("u"), table.column("v")))
    u, v = table.column("u"), table.column("v")
    larger = pc.greater(u, v)
    return pa.table({"node": pc.if_else(larger, u, v), "nbr": pc.if_else(larger, v, u)})


def unsettled_count(adj: pd.DataFrame) -> pd.DataFrame:
    """One row: how many nodes of this block still break the star shape (a smaller neighbour and degree > 1)."""
    if adj.empty:
        return pd.DataFrame({"unsettled": [0]})
    adj = adj.drop_duplicates()
    group = adj.groupby("node")["nbr"]
    smallest, degree = group.min(), group.size()
    unsettled = (smallest < smallest.index.to_series()) & (degree > 1)
    return pd.DataFrame({"unsettled": [int(unsettled.sum())]})


def large_star(adj: pd.DataFrame) -> pd.DataFrame:
    """Every neighbour larger than its node is linked to the smallest of the node and its neighbours."""
    if adj.empty:
        return _no_rows(["u", "v"])
    adj = adj.drop_duplicates()
    smallest = adj.groupby("node")["nbr"].transform("min")
    m = smallest.where(smallest < adj["node"], adj["node"])
    larger = adj["nbr"] > adj["node"]
    return _edges(adj["nbr"][larger], m[larger]).drop_duplicates().reset_index(drop=True)


def small_star(adj: pd.DataFrame) -> pd.DataFrame:
    """Rows ``node > nbr``: the node and its (smaller) neighbours are all linked to the smallest neighbour."""
    if adj.empty:
        return _no_rows(["u", "v"])
    adj = adj.drop_duplicates()
    smallest = adj.groupby("node")["nbr"].transform("min")
    leaves = adj["nbr"] != smallest
    edges = pd.concat([_edges(adj["nbr"][leaves], smallest[leaves]), _edges(adj["node"], smallest)])
    return edges.drop_duplicates().reset_index(drop=True)


def star_members(adj: pd.DataFrame) -> pd.DataFrame:
    """For a settled adjacency: ``id, keeper, cluster_size`` of every member, emitted by its star's centre
    (a node with no smaller neighbour); leaves emit nothing, their centre covers them."""
    if adj.empty:
        return _no_rows(["id", "keeper"]).assign(cluster_size=pd.Series([], dtype="int64"))
    adj = adj.drop_duplicates()
    smallest = adj.groupby("node")["nbr"].transform("min")
    rows = adj[smallest > adj["node"]]  # centres: every neighbour is larger
    size = rows.groupby("node")["nbr"].transform("size") + 1
    leaves = pd.DataFrame({"id": rows["nbr"], "keeper": rows["node"], "cluster_size": size})
    first = ~rows["node"].duplicated()
    centres = pd.DataFrame({"id": rows["node"][first], "keeper": rows["node"][first], "cluster_size": size[first]})
    out = pd.concat([centres, leaves], ignore_index=True)
    out["cluster_size"] = out["cluster_size"].astype("int64")
    return out.astype({"id": object, "keeper": object})


EDGE_SCHEMA = pa.schema([("u", pa.string()), ("v", pa.string())])
MEMBER_SCHEMA = pa.schema([("id", pa.string()), ("keeper", pa.string()), ("cluster_size", pa.int64())])


def typed(fn, schema: pa.Schema):
    """``fn`` with its pandas result as an arrow table of ``schema``: an empty pandas object column would
    otherwise become arrow's null type, which Ray Data's joins then treat as a missing column."""
    def run(df: pd.DataFrame) -> pa.Table:
        return pa.Table.from_pandas(fn(df), schema=schema, preserve_index=False)
    run.__name__ = fn.__name__
    return run


def connected_components(edges_ds, num_blocks: int) -> tuple[object, int]:
    """Dataset of edges ``u, v`` -> (materialized dataset ``id, keeper, cluster_size`` of every node in an edge,
    rounds run). The driver sees one integer per block per round."""
    for rounds in range(MAX_ROUNDS):
        adj = (edges_ds.map_batches(both_directions, batch_format="pyarrow")
               .repartition(num_blocks, keys=["node"]).materialize())
        counts = adj.map_batches(unsettled_count, batch_size=None, batch_format="pandas").take_all()
        if sum(row["unsettled"] for row in counts) == 0:
            members = adj.map_batches(typed(star_members, MEMBER_SCHEMA), batch_size=None, batch_format="pandas")
            return members.materialize(), rounds
        edges_ds = (adj.map_batches(typed(large_star, EDGE_SCHEMA), batch_size=None, batch_format="pandas")
                    .map_batches(larger_to_smaller, batch_format="pyarrow")
                    .repartition(num_blocks, keys=["node"])
                    .map_batches(typed(small_star, EDGE_SCHEMA), batch_size=None, batch_format="pandas")
                    .materialize())
    raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")
