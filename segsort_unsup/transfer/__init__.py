"""Using labelled prototypes: the ``transfer`` stage (kNN label maps) and ``retrieve`` (pictures of
query segments beside their nearest labelled segments)."""
