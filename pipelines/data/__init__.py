"""``raylm data``: a Ray Data pipeline from raw documents to packed token shards (see docs/data.md)."""
