"""The ``jfe`` subcommands' argument parsing, above the code they run (``jfe_jax.cli`` names
them by module): ``index`` (``jfe export``, ``jfe index``, ``jfe search``) and ``eval``
(``jfe eval``)."""
