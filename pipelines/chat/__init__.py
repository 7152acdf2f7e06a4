"""What sft, reward, ppo (and dpo) share about chat data: reading records (``records``), the built-in Q/A pairs
(``builtin_qa``), and tokenized train/validation splits on disk (``splits``). Hugging Face model loading and
export live beside it in ``pipelines.hf_models``. One home, so the stages never import each other."""
