"""An export directory's file names, shared by its writer (``jfe_jax.index.export``) and its
reader (``jfe_jax.index.pool``): one ``shard-NNNNN/`` folder per shard, with the identity it
was made under, and one metadata file per host."""

SHARD_PATTERN = "shard-{:05d}"
METADATA_PATTERN = "metadata-host{:03d}.json"
IDENTITY_FILE = "identity.json"
