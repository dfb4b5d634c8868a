"""One module per chapter: the computations behind its figures, so notebooks stay thin.

A chapter's id is its notebook's stem without the number prefix (``book/05_4_preserve_first_merging``
→ ``preserve_first_merging``); it names both its module here and its parameters,
``vfnb.config.EXPERIMENTS[id]``. Shared pieces: :mod:`.common` (edge models, data, alignment) and
:mod:`.claims` (the claims table with its noise margin).
"""
