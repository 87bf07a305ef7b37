"""User commands besides training: `export` (merge and save), `chat` (terminal chat), `eval` (score a policy)."""
