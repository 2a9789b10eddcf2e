"""The errors `dnc` turns into an exit status: 2 for input that cannot be used, 3 for too many failed rows, 4 for
a spent budget (cli.py); raised from every layer, so they live at the bottom."""


class ConfigError(ValueError):
    """A config file that cannot be used; the message names file, line and field."""


class RowsFailed(Exception):
    """More rows failed than the config's `max_failed_rows` allows: the CLI exits 3 (the rows are written)."""


class BudgetReached(Exception):
    """`budget_usd` stopped the run before every row was done: the CLI exits 4 (finished rows are written; a run
    with a higher budget_usd resumes the others)."""
