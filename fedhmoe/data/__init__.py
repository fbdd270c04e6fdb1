"""Data layer: task sources, client partitions, splits, prompt formatting and answer scoring.

Import from the module that defines a name; this package imports nothing, so that the pure modules
(``partition``, ``types``, ``scoring``, ``jsonl``) load without torch.

- ``types``: the records ``Example`` and ``ClientData``.
- ``partition``: splitting a pool of examples over clients (numpy only).
- ``splits``: from a config to each client's train/aux/val/test examples (``build_federated_data``,
  ``client_data``).
- ``hub``, ``jsonl``, ``reasoning_gym``: the task sources.
- ``format``: prompt templates, tokenisation and collation (``PromptFormatter``; needs torch).
- ``scoring``: answers against references (``match_choice``, ``score_answer``, ``generated_score``).
"""
