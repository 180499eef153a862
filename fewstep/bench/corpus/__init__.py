"""Raw T2I and edit corpora built from the tiny world (``fewstep corpus build``).

- :mod:`.phrasing`: prompts and edit instructions from structured attributes.
- :mod:`.sample`: random scene attrs and edit metas from the vocabulary.
- :mod:`.build`: plan (hold-out aware), render and publish Parquet parts + ``corpus.json``.
"""
