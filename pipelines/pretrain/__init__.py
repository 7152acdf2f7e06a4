"""``raylm pretrain``: the recipe's model trained on the packed shards with the shared engine."""
